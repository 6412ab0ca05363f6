"""`merg explore`: a local, read-only web app over the store, its clips, the sweep results and the runs.

    app = create_app(ExploreSources(store=Path("data/demo/store"), runs=Path("data/demo/runs")))
    uvicorn.run(app, host="127.0.0.1", port=8765)

Server: FastAPI on uvicorn; pages are plain HTML + vanilla JS from `static/` (no network, no CDN).
Safety (threat model: local only, read-only, Host-checked):
- every file the server sends is looked up by key in tables it built at start (the store's rows for
  clips, a listing of the report folder for report files, the fixed static files); no part of a request
  path reaches the file system. A listed file is served only while its real path (links resolved) stays
  inside the folder it was listed in: a link that leaves is refused and logged, at start and per request;
- only the host names the server was started for are answered (a DNS-rebinding page gets 400), every
  answer carries a strict Content-Security-Policy, request bodies are capped at MAX_BODY bytes, and one
  reply is generated at a time (a second one meanwhile gets 429);
- no endpoint writes the store (the reply box generates, it stores nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from featurestore.schema import EMBEDDING_COLUMNS, EVAL_OUTPUTS, EVAL_RESULTS
from featurestore.store import Store, build_filter

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # served by name from this table only
BROWSE_COLUMNS = ["key", "split", "speaker", "emotion", "sentiment", "text", "face_visible", "asd_score", "clip_path"]
PAGE_LIMIT = 200
REPORT_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".md": "text/markdown", ".html": "text/html", ".csv": "text/csv", ".json": "application/json"}  # fmt: skip
MAX_BODY = 64 * 1024  # bytes a request body may have (only POST /api/reply takes one)
MAX_HISTORY_LINES = 200
# The app's own pages: scripts, styles, media and fetches from this server only, no inline code.
APP_POLICY = "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
# Report files (an .html or .svg opened directly): no script at all; the report's inline <style> may apply.
REPORT_POLICY = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"  # fmt: skip
SECURITY_HEADERS = {
    "content-security-policy": APP_POLICY, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin", "x-frame-options": "DENY",
}  # fmt: skip
# Recorded failures after which the job kept the clip's video (so a contact sheet can still be drawn).
VIDEO_KEPT = {"no_audio_stream", "audio_decode_error"}


@dataclass
class ExploreSources:
    store: Path
    meld_root: Path | None = None  # where clips are, if not at the store rows' clip_path
    runs: Path | None = None  # runs/ folder: the reply box's choices
    report: Path | None = None  # a `merg report` folder: its tables and plots


class ExplorerBusy(RuntimeError):
    """A reply asked for while another is being generated."""


class SheetUnavailable(LookupError):
    """A contact sheet that cannot be drawn: the clip was recorded as failed, or rendering failed."""


class ReplyRequest(BaseModel):
    """POST /api/reply's body. `history` is a list of "Speaker: text" lines, or one string of such lines
    separated by newlines (as `merg reply --history` takes it); empty or absent: the utterance's dialogue."""

    model_config = ConfigDict(extra="forbid")
    run: str = Field(max_length=255)
    key: str | None = Field(None, max_length=255)
    history: list[str] | None = Field(None, max_length=MAX_HISTORY_LINES)
    speaker: str | None = Field(None, max_length=255)
    allow_text_only: StrictBool = False

    @field_validator("history", mode="before")
    @classmethod
    def _lines_of_a_string(cls, value: Any) -> Any:
        from evaluation.reply import parse_history

        return parse_history(value) if isinstance(value, str) else value  # one line per line, never per character


def contained(path: Path, root: Path) -> Path | None:
    """`path`'s real location if it is a readable regular file inside `root` (links resolved), else None.
    A file whose links lead out of `root` is refused with a warning in the log."""
    from pipelines.media import check_clip_path

    try:
        real = path.resolve(strict=True)
        real_root = root.resolve(strict=True)
    except (OSError, RuntimeError):  # gone, a dangling link or a loop
        return None
    if not real.is_relative_to(real_root):
        log.warning("refused to serve %s: it resolves to %s, outside %s", path, real, real_root)
        return None
    return real if check_clip_path(real) is None else None  # a regular, readable file (no FIFO, device or folder)


def _finite(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> list[str]:
    """The Host header names the server answers: loopback names, the address it binds, and `extra`
    (names it is reached by when bound elsewhere). Ports are not compared; a missing or empty Host is refused."""
    names = ["127.0.0.1", "localhost", "[::1]", host, *extra]
    return sorted({f"[{n}]" if ":" in n and not n.startswith("[") else n.lower() for n in names if n and n != "*"})


class SecurityHeaders:
    """ASGI middleware: the security headers on every answer (a route's own CSP is kept)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        from starlette.datastructures import MutableHeaders

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, whether it declares its length or streams."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse
        from starlette.datastructures import Headers

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over {self.limit} bytes"
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a chunked body: stop reading at the limit
                raise HTTPException(status_code=413, detail=too_large)
            return message

        await self.app(scope, counted, send)


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
        self._reply_lock = threading.Lock()  # one reply at a time per server
        self._sheets = tempfile.TemporaryDirectory(prefix="merg-explore-sheets-")  # rendered contact sheets
        self._sheet_locks: dict[str, threading.Lock] = {}  # one render per key; the others wait for it
        self._sheet_locks_lock = threading.Lock()
        self.no_sheet: dict[str, str] = {  # key -> why there is no contact sheet
            key: "; ".join(f"{f['stage']}: {f['reason']}" + (f" ({f['detail']})" if f["detail"] else "") for f in bad)
            for key, items in self.failures.items()
            if (bad := [f for f in items if f["stage"] in ("read", "decode") and f["reason"] not in VIDEO_KEPT])
        }  # fmt: skip

    # ---- lookups built once ----------------------------------------------------------------------
    def _clip_table(self) -> dict[str, Path]:
        """key -> the clip's real path, for rows whose clip is a file inside its own folder (the store's
        path, else the MELD layout's); the folder is the root the clip must stay in when served."""
        from pipelines.meld import read_splits

        layout = {}
        if self.sources.meld_root is not None:
            readings = read_splits(self.sources.meld_root)
            layout = {r.key: r.clip_path for reading in readings.values() for r in reading.records if r.clip_path}
        clips = {}
        paths = self.rows.column("clip_path").to_pylist() if "clip_path" in self.rows.column_names else [None] * len(self.position)
        for key, stored in zip(self.position, paths):
            for path in (Path(stored) if stored else None, layout.get(key)):
                real = contained(path, path.absolute().parent) if path is not None else None
                if real is not None:
                    clips[key] = real
                    break
        return clips

    def _report_table(self) -> dict[str, Path]:
        """name -> the real path of each report file that stays inside the report folder."""
        folder = self.sources.report
        if folder is None or not folder.is_dir():
            return {}
        listed = ((p.name, contained(p, folder)) for p in sorted(folder.iterdir()) if p.suffix in REPORT_TYPES)
        return {name: real for name, real in listed if real is not None}

    def clip_file(self, key: str) -> Path | None:
        """The clip of `key`, checked again now: still a file in its folder (not since replaced by a link out)."""
        path = self.clips.get(key)
        return contained(path, path.parent) if path is not None else None

    def report_file(self, name: str) -> Path | None:
        path = self.report_files.get(name)
        return contained(path, self.sources.report) if path is not None else None

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
        row["sheet_url"] = f"/media/sheet/{key}" if key in self.clips and key not in self.no_sheet else None
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
        show`), rendered once into a temporary folder; named by a hash of the key. Concurrent first asks
        wait for the one render, which is written to a temporary file and renamed into place, so no
        answer reads a half-written sheet. Raises SheetUnavailable with the reason for a failed clip."""
        clip = self.clip_file(key)
        if clip is None:
            return None
        with self._sheet_locks_lock:
            lock = self._sheet_locks.setdefault(key, threading.Lock())
        target = Path(self._sheets.name) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.png"
        with lock:
            if key in self.no_sheet:
                raise SheetUnavailable(f"no contact sheet for {key}: {self.no_sheet[key]}")
            if not target.exists():
                self._render_sheet(key, clip, target)
        return target

    def _render_sheet(self, key: str, clip: Path, target: Path) -> None:
        from pipelines.asd.show import contact_sheet

        partial = target.with_name(f"{target.stem}.partial.png")  # cv2 picks the format by the suffix
        try:
            contact_sheet(clip, partial)
            if not partial.is_file() or partial.stat().st_size == 0:
                raise RuntimeError("no image was written")
        except Exception as exc:  # noqa: BLE001 - a clip that cannot be drawn is a 404 with its reason, not a 500
            from infra.errors import explain

            partial.unlink(missing_ok=True)
            self.no_sheet[key] = f"rendering failed: {explain(exc)}"
            log.warning("contact sheet of %s: %s", key, self.no_sheet[key])
            raise SheetUnavailable(f"no contact sheet for {key}: {self.no_sheet[key]}") from None
        os.replace(partial, target)

    def results(self, sweep: str | None) -> dict:
        cells = self.store.read_records(EVAL_RESULTS, build_filter(sweep=sweep, status="done"))
        cells = cells.select(["cell", "sweep", "system", "preset", "split", "examples", "metrics"]).to_pylist()
        for cell in cells:
            metrics = json.loads(cell.pop("metrics") or "{}")
            metrics = {k: v for k, v in metrics.items() if isinstance(v, dict) and "value" in v}
            cell["metrics"] = {k: _finite(v["value"]) for k, v in metrics.items()}  # NaN (no value) is null: JSON has no NaN
            cell["intervals"] = {  # the bootstrap 95% interval, where there is one (as the report prints it)
                k: list(v["ci"]) for k, v in metrics.items() if isinstance(v.get("ci"), list) and all(_finite(x) is not None for x in v["ci"])
            }  # fmt: skip
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
        """`merg reply`'s code with one of the listed runs; the clip is the utterance's, by key. One reply
        at a time per server (generation takes the CPUs): asked meanwhile, it raises ExplorerBusy."""
        from evaluation.reply import Replier, default_next_speaker

        if not self._reply_lock.acquire(blocking=False):
            raise ExplorerBusy("another reply is being generated (one at a time per server): ask again when it is done")
        try:  # runs stay loaded
            if run not in self._repliers:
                self._repliers[run] = Replier(self.runs[run])
            replier = self._repliers[run]
            if not history and key is not None:
                history = self._history_up_to(key)
            return replier(history or [], self.clip_file(key) if key else None, speaker or default_next_speaker(history or []),
                           allow_text_only=allow_text_only).to_dict()  # fmt: skip
        finally:
            self._reply_lock.release()

    def _history_up_to(self, key: str, lines: int = 5) -> list[str]:
        """The dialogue's lines up to and including `key` (from the store's rows)."""
        split, name = key.split("/", 1)
        dialogue = name.split("_utt")[0]
        rows = [r for r in self.rows.filter(pc.starts_with(self.rows.column("key"), f"{split}/{dialogue}_utt")).to_pylist()]
        rows.sort(key=lambda r: int(r["key"].rsplit("_utt", 1)[1]))
        upto = [r for r in rows if int(r["key"].rsplit("_utt", 1)[1]) <= int(key.rsplit("_utt", 1)[1])]
        return [f"{r['speaker']}: {r['text']}" for r in upto[-lines:]]


def create_app(sources: ExploreSources, host: str = "127.0.0.1", allow_hosts: Iterable[str] = ()):
    """The app over `sources`, answering only requests whose Host is a loopback name, `host` (the
    address it binds) or one of `allow_hosts`."""
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse, HTMLResponse, Response
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    explorer = Explorer(sources)
    app = FastAPI(title="merg explore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = explorer
    app.add_middleware(BodyLimit)  # the last added runs first: Host check, then headers, then the body cap
    app.add_middleware(SecurityHeaders)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host, allow_hosts), www_redirect=False)
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
        path = explorer.clip_file(key)  # by key only: a request's text never becomes a path
        if path is None:
            raise not_found()
        return FileResponse(path, media_type="video/mp4")

    @app.get("/media/sheet/{key:path}")
    def sheet(key: str) -> FileResponse:
        try:
            path = explorer.sheet(key)
        except SheetUnavailable as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        if path is None:
            raise not_found()
        return FileResponse(path, media_type="image/png")

    @app.get("/media/report/{name}")
    def report_file(name: str) -> FileResponse:
        path = explorer.report_file(name)
        if path is None:
            raise not_found()
        return FileResponse(path, media_type=REPORT_TYPES[Path(name).suffix], headers={"content-security-policy": REPORT_POLICY})

    @app.post("/api/reply")
    def reply(body: ReplyRequest) -> dict:
        from evaluation.reply import ReplyError

        if body.run not in explorer.runs or (body.key is not None and body.key not in explorer.position):
            raise not_found()
        try:
            return explorer.reply(body.run, body.key, body.history, body.speaker, body.allow_text_only)
        except ExplorerBusy as exc:
            raise HTTPException(status_code=429, detail=str(exc), headers={"retry-after": "10"}) from None
        except ReplyError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc

    return app
