"""`merg explore`: a local, read-only web app over the store, its clips, the sweep results and the runs.

    app = create_app(ExploreSources(store=Path("data/demo/store"), runs=Path("data/demo/runs")))
    uvicorn.run(app, host="127.0.0.1", port=8765)

Server: FastAPI on uvicorn; pages are plain HTML + vanilla JS from `static/` (no network, no CDN).
Safety: every file the server sends is looked up by key in tables it built at start (the store's
rows for clips, a listing of the report folder for report files, the fixed static files); no part of
a request path reaches the file system. No endpoint writes the store (the reply box generates, it
stores nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from featurestore.schema import EMBEDDING_COLUMNS, EVAL_OUTPUTS, EVAL_RESULTS
from featurestore.store import Store, build_filter

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # served by name from this table only
BROWSE_COLUMNS = ["key", "split", "speaker", "emotion", "sentiment", "text", "face_visible", "asd_score", "clip_path"]
PAGE_LIMIT = 200
REPORT_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".md": "text/markdown", ".html": "text/html", ".csv": "text/csv", ".json": "application/json"}  # fmt: skip


@dataclass
class ExploreSources:
    store: Path
    meld_root: Path | None = None  # where clips are, if not at the store rows' clip_path
    runs: Path | None = None  # runs/ folder: the reply box's choices
    report: Path | None = None  # a `merg report` folder: its tables and plots


class Explorer:
    """What the endpoints read, loaded once: the store's rows (without vectors), failures, clip and
    report lookups by key, warm neighbour indexes (built on first ask) and the runs' repliers."""

    def __init__(self, sources: ExploreSources):
        self.sources = sources
        self.store = Store.open(sources.store)
        self.rows = self.store.query(columns=[c for c in BROWSE_COLUMNS if c in self.store.query(limit=0).column_names]).sort_by("key")
        failures = self.store.failures(columns=["key", "stage", "reason", "detail"])
        self.failures: dict[str, list[dict]] = {}
        for f in failures.to_pylist():
            self.failures.setdefault(f["key"], []).append(f)
        self.rows = self.rows.append_column(
            "failure", pa.array([";".join(sorted({f["reason"] for f in self.failures.get(k, [])})) or None
                                 for k in self.rows.column("key").to_pylist()], pa.string()),  # fmt: skip
        )
        self.position = {k: i for i, k in enumerate(self.rows.column("key").to_pylist())}
        self.clips = self._clip_table()
        self.report_files = self._report_table()
        self.runs = self._run_table()
        self._repliers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._sheets = tempfile.TemporaryDirectory(prefix="merg-explore-sheets-")  # rendered contact sheets

    # ---- lookups built once ----------------------------------------------------------------------
    def _clip_table(self) -> dict[str, Path]:
        """key -> clip file, for rows whose clip exists (the store's path, else the MELD layout)."""
        from pipelines.meld import read_splits

        layout = {}
        if self.sources.meld_root is not None:
            readings = read_splits(self.sources.meld_root)
            layout = {r.key: r.clip_path for reading in readings.values() for r in reading.records if r.clip_path}
        clips = {}
        paths = self.rows.column("clip_path").to_pylist() if "clip_path" in self.rows.column_names else [None] * len(self.position)
        for key, stored in zip(self.position, paths):
            path = Path(stored) if stored else None
            if path is None or not path.is_file():
                path = layout.get(key)
            if path is not None and path.is_file():
                clips[key] = path
        return clips

    def _report_table(self) -> dict[str, Path]:
        folder = self.sources.report
        if folder is None or not folder.is_dir():
            return {}
        return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in REPORT_TYPES}

    def _run_table(self) -> dict[str, Path]:
        folder = self.sources.runs
        if folder is None or not folder.is_dir():
            return {}
        return {p.name: p for p in sorted(folder.iterdir()) if (p / "run.json").is_file()}

    # ---- answers ---------------------------------------------------------------------------------
    def facets(self) -> dict:
        def counts(column: str) -> dict:
            values = self.rows.column(column).cast(pa.string()).fill_null("unknown")
            return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(values).to_pylist()}

        failures = {}
        for items in self.failures.values():
            for reason in {f["reason"] for f in items}:
                failures[reason] = failures.get(reason, 0) + 1
        return dict(
            rows=self.rows.num_rows, store=str(self.sources.store), version=self.store.version,
            split=counts("split"), emotion=counts("emotion"), sentiment=counts("sentiment"), speaker=counts("speaker"),
            face_visible=counts("face_visible"), failure=failures, columns=list(EMBEDDING_COLUMNS),
            runs=list(self.runs), report=list(self.report_files),
        )  # fmt: skip

    def browse(self, filters: dict[str, str | None], text: str | None, offset: int, limit: int) -> dict:
        mask = pa.array([True] * self.rows.num_rows)
        for column, value in filters.items():
            if not value:
                continue
            if column == "failure":  # one of the row's reasons, exactly
                reasons = self.rows.column("failure").to_pylist()
                mask = pc.and_(mask, pa.array([value in (r or "").split(";") for r in reasons]))
            elif column == "face_visible" and value == "unknown":
                mask = pc.and_(mask, pc.is_null(self.rows.column(column)))
            elif column == "face_visible":
                wanted = value.lower() in ("true", "1", "yes")
                mask = pc.and_(mask, pc.fill_null(pc.equal(self.rows.column(column), wanted), False))
            else:
                mask = pc.and_(mask, pc.fill_null(pc.equal(self.rows.column(column), value), False))
        if text:
            mask = pc.and_(mask, pc.fill_null(pc.match_substring(self.rows.column("text"), text, ignore_case=True), False))
        found = self.rows.filter(mask)
        page = found.slice(offset, min(limit, PAGE_LIMIT)).drop_columns(["clip_path"] if "clip_path" in found.column_names else [])
        items = page.to_pylist()
        for item in items:
            item["has_clip"] = item["key"] in self.clips
        return dict(total=found.num_rows, offset=offset, items=items)

    def utterance(self, key: str) -> dict | None:
        if key not in self.position:
            return None
        row = self.store.query(where=build_filter(key=key)).to_pylist()[0]
        for column in EMBEDDING_COLUMNS:
            row[column] = None if row.get(column) is None else len(row[column])  # the width, not the vector
        row.pop("clip_path", None)  # the page gets the clip by key, never a path
        row = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
        row["failures"] = [dict(stage=f["stage"], reason=f["reason"], detail=f["detail"]) for f in self.failures.get(key, [])]
        row["clip_url"] = f"/media/clip/{key}" if key in self.clips else None
        row["sheet_url"] = f"/media/sheet/{key}" if key in self.clips else None
        return row

    def similar(self, key: str, column: str, emotion: str | None, k: int) -> dict:
        from featurestore.index import warm_index

        index = warm_index(self.store, column, now=True)  # built once per column, then warm
        where = build_filter(emotion=emotion or None)
        try:
            table = index.similar(key, k=k, where=where, columns=["key", "split", "speaker", "emotion", "text"])
        except KeyError:
            return dict(items=[], note=f"{key} has no {column}")
        items = table.to_pylist()
        for item in items:
            item["clip_url"] = f"/media/clip/{item['key']}" if item["key"] in self.clips else None
        return dict(items=items, column=column, path="exact" if index._rows(where).reduced is None else "reduced+re-rank")

    def sheet(self, key: str) -> Path | None:
        """The contact sheet of a clip's face tracks, their scores and the chosen speaker (`merg asd
        show`), rendered once into a temporary folder; named by a hash of the key."""
        if key not in self.clips:
            return None
        target = Path(self._sheets.name) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.png"
        if not target.exists():
            from pipelines.asd.show import contact_sheet

            contact_sheet(self.clips[key], target)
        return target

    def results(self, sweep: str | None) -> dict:
        cells = self.store.read_records(EVAL_RESULTS, build_filter(sweep=sweep, status="done"))
        cells = cells.select(["cell", "sweep", "system", "preset", "split", "examples", "metrics"]).to_pylist()
        for cell in cells:
            metrics = json.loads(cell.pop("metrics") or "{}")
            cell["metrics"] = {k: v["value"] for k, v in metrics.items() if isinstance(v, dict) and "value" in v}
        names = {c["cell"]: f"{c['system']} / {c['preset']}" for c in cells}
        outputs = self.store.read_records(EVAL_OUTPUTS, build_filter(cell=list(names)) if names else "false")
        pairs: dict[str, dict] = {}
        for o in outputs.to_pylist():
            pair = pairs.setdefault(o["key"], dict(key=o["key"], history=o["history"], next_speaker=o["next_speaker"],
                                                   reference=o["reference"], replies={}))  # fmt: skip
            pair["replies"][names[o["cell"]]] = dict(
                reply=o["reply"], bertscore_f1=o["bertscore_f1"], emotion_alignment=o["emotion_alignment"],
                sentiment_alignment=o["sentiment_alignment"],
            )  # fmt: skip
        sweeps = sorted(set(self.store.read_records(EVAL_RESULTS, columns=["sweep"]).column("sweep").to_pylist()) - {None})
        return dict(sweeps=sweeps, cells=cells, systems=list(names.values()), pairs=sorted(pairs.values(), key=lambda p: p["key"]))

    def reply(self, run: str, key: str | None, history: list[str] | None, speaker: str | None, allow_text_only: bool) -> dict:
        """`merg reply`'s code with one of the listed runs; the clip is the utterance's, by key."""
        from evaluation.reply import Replier, default_next_speaker

        with self._lock:  # one generation at a time; runs stay loaded
            if run not in self._repliers:
                self._repliers[run] = Replier(self.runs[run])
            replier = self._repliers[run]
            if not history and key is not None:
                history = self._history_up_to(key)
            return replier(history or [], self.clips.get(key) if key else None, speaker or default_next_speaker(history or []),
                           allow_text_only=allow_text_only).to_dict()  # fmt: skip

    def _history_up_to(self, key: str, lines: int = 5) -> list[str]:
        """The dialogue's lines up to and including `key` (from the store's rows)."""
        split, name = key.split("/", 1)
        dialogue = name.split("_utt")[0]
        rows = [r for r in self.rows.filter(pc.starts_with(self.rows.column("key"), f"{split}/{dialogue}_utt")).to_pylist()]
        rows.sort(key=lambda r: int(r["key"].rsplit("_utt", 1)[1]))
        upto = [r for r in rows if int(r["key"].rsplit("_utt", 1)[1]) <= int(key.rsplit("_utt", 1)[1])]
        return [f"{r['speaker']}: {r['text']}" for r in upto[-lines:]]


def create_app(sources: ExploreSources):
    from fastapi import Body, FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse, HTMLResponse, Response

    explorer = Explorer(sources)
    app = FastAPI(title="merg explore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = explorer
    index_html = (STATIC / "index.html").read_text()

    def not_found() -> HTTPException:
        return HTTPException(status_code=404, detail="not found")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return index_html

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise not_found()
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])

    @app.get("/api/facets")
    def facets() -> dict:
        return explorer.facets()

    @app.get("/api/utterances")
    def utterances(
        split: str | None = None, emotion: str | None = None, sentiment: str | None = None, speaker: str | None = None,
        face_visible: str | None = None, failure: str | None = None, q: str | None = None,
        offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=PAGE_LIMIT),
    ) -> dict:  # fmt: skip
        filters = dict(split=split, emotion=emotion, sentiment=sentiment, speaker=speaker, face_visible=face_visible, failure=failure)
        return explorer.browse(filters, q, offset, limit)

    @app.get("/api/utterance/{key:path}")
    def utterance(key: str) -> dict:
        row = explorer.utterance(key)
        if row is None:
            raise not_found()
        return row

    @app.get("/api/similar/{key:path}")
    def similar(key: str, column: str = "fused_emb", emotion: str | None = None, k: int = Query(10, ge=1, le=50)) -> dict:
        if key not in explorer.position or column not in EMBEDDING_COLUMNS:
            raise not_found()
        return explorer.similar(key, column, emotion, k)

    @app.get("/api/results")
    def results(sweep: str | None = None) -> dict:
        return explorer.results(sweep)

    @app.get("/media/clip/{key:path}")
    def clip(key: str) -> FileResponse:
        path = explorer.clips.get(key)  # by key only: a request's text never becomes a path
        if path is None:
            raise not_found()
        return FileResponse(path, media_type="video/mp4")

    @app.get("/media/sheet/{key:path}")
    def sheet(key: str) -> FileResponse:
        path = explorer.sheet(key)
        if path is None:
            raise not_found()
        return FileResponse(path, media_type="image/png")

    @app.get("/media/report/{name}")
    def report_file(name: str) -> FileResponse:
        path = explorer.report_files.get(name)
        if path is None:
            raise not_found()
        return FileResponse(path, media_type=REPORT_TYPES[path.suffix])

    @app.post("/api/reply")
    def reply(body: dict = Body(...)) -> dict:
        from evaluation.reply import ReplyError

        run, key = body.get("run"), body.get("key")
        if run not in explorer.runs or (key is not None and key not in explorer.position):
            raise not_found()
        try:
            return explorer.reply(run, key, body.get("history"), body.get("speaker"), bool(body.get("allow_text_only")))
        except ReplyError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc

    return app
