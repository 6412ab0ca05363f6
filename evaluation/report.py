"""`report(store, sweep, out_dir)`: `report.md` + `report.html` with tables, plots and examples.

Tables in the reference system's layout (Method / Model / PPL / Dist-2 / BERTScore F1 / Emotion /
Sentiment / Empathy), once with merg's standard definitions and once with the reference system's,
each value with its bootstrap 95% interval; bar charts with the intervals; the confusion of the
reply's emotion against the reference's per system; a few dialogues with every system's reply; and
the notes on stand-in or random-init models behind any number.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from featurestore.schema import EMOTIONS, EVAL_OUTPUTS, EVAL_RESULTS
from featurestore.store import Store, build_filter

STANDARD = [("PPL", "ppl"), ("Dist-1", "dist1"), ("Dist-2", "dist2"), ("BERTScore F1", "bertscore_f1"),
            ("Emotion", "emotion"), ("Sentiment", "sentiment"), ("Empathy", "empathy"), ("Emotion acc.", "emotion_accuracy")]  # fmt: skip
REFERENCE = [("PPL (self)", "ref_self_ppl"), ("PPL (uncond. ref.)", "ref_uncond_ppl"), ("Dist-2", "dist2"),
             ("BERTScore F1", "bertscore_f1"), ("Emotion (history)", "ref_emotion"),
             ("Sentiment (history)", "ref_sentiment"), ("Empathy (history)", "ref_empathy")]  # fmt: skip
CHARTED = [("BERTScore F1", "bertscore_f1"), ("Emotion", "emotion"), ("Sentiment", "sentiment"),
           ("Empathy", "empathy"), ("Dist-2", "dist2"), ("PPL", "ppl")]  # fmt: skip


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    images: list[Path]
    cells: int


def _fmt(metric: dict | None) -> str:
    if not metric or metric.get("value") is None or np.isnan(metric["value"]):
        return "–"
    value = metric["value"]
    digits = 2 if abs(value) >= 10 else 3
    if "ci" in metric and not any(np.isnan(metric["ci"])):
        lo, hi = metric["ci"]
        return f"{value:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"
    return f"{value:.{digits}f}"


def _latest_results(store: Store, sweep: str | None) -> list[dict]:
    table = store.read_records(EVAL_RESULTS, build_filter(sweep=sweep))
    rows = sorted(table.to_pylist(), key=lambda r: r["created_at"])
    latest = {(r["sweep"], r["system"], r["preset"], r["split"]): r for r in rows}  # the newest run of each cell
    return sorted(latest.values(), key=lambda r: (r["sweep"], Path(r["model"] or "").name.casefold(), r["system"].casefold(), r["preset"], r["split"]))


def _bar_charts(done: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['system']}\n{r['preset']}/{r['split']}" for r in done]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, key) in zip(axes.flat, CHARTED):
        values = np.array([r["metrics"][key]["value"] for r in done], dtype=float)
        cis = np.array([r["metrics"][key].get("ci", [v, v]) for r, v in zip(done, values)], dtype=float)
        errors = np.abs(np.stack([values - cis[:, 0], cis[:, 1] - values]))
        ax.bar(range(len(done)), values, yerr=errors, capsize=4, color=plt.cm.tab10(np.arange(len(done)) % 10))
        ax.set_title(title)
        ax.set_xticks(range(len(done)), labels, rotation=30, ha="right", fontsize=7)
    fig.suptitle("merg evaluation (bars: bootstrap 95% intervals)")
    fig.tight_layout()
    path = out / "metrics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _confusion(store: Store, done: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(done), figsize=(4.2 * len(done), 4.2), squeeze=False)
    for ax, result in zip(axes[0], done):
        outputs = store.read_records(EVAL_OUTPUTS, build_filter(cell=result["cell"]), ["reply_emotion", "reference_emotion"])
        matrix = np.zeros((len(EMOTIONS), len(EMOTIONS)))
        for reply, ref in zip(*(outputs.column(c).to_pylist() for c in ("reply_emotion", "reference_emotion"))):
            matrix[EMOTIONS.index(ref), EMOTIONS.index(reply)] += 1
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(EMOTIONS)), EMOTIONS, fontsize=7)
        ax.set_xlabel("reply emotion")
        ax.set_ylabel("reference emotion")
        ax.set_title(f"{result['system']} ({result['preset']})", fontsize=9)
    fig.tight_layout()
    path = out / "emotion_confusion.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _examples(store: Store, done: list[dict], count: int) -> list[dict]:
    """A few pairs every reported cell answered: the dialogue, the reference, each system's reply."""
    per_cell = {r["cell"]: store.read_records(EVAL_OUTPUTS, build_filter(cell=r["cell"])) for r in done}
    common = set.intersection(*(set(t.column("key").to_pylist()) for t in per_cell.values())) if per_cell else set()
    examples = []
    for key in sorted(common)[:count]:
        replies = {}
        for result in done:
            table = per_cell[result["cell"]]
            row = table.filter(pc.equal(table.column("key"), key)).to_pylist()[0]
            replies[f"{result['system']} ({result['preset']})"] = row["reply"]
        examples.append(dict(key=key, history=row["history"], next_speaker=row["next_speaker"], reference=row["reference"], replies=replies))
    return examples


def _table(done: list[dict], columns: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "Model", "Modality", "Decoding", "Split", "N"] + [name for name, _ in columns]
    body = [
        [r["system"], Path(r["model"]).name, r["modality"], r["preset"], r["split"], str(r["examples"])]
        + [_fmt(r["metrics"].get(key)) for _, key in columns]
        for r in done
    ]
    return header, body


def report(store: Store, sweep: str | None, out_dir: Path, examples: int = 3) -> ReportFiles:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = _latest_results(store, sweep)
    done = [dict(r, metrics=json.loads(r["metrics"])) for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] != "done"]
    if not results:
        raise ValueError(f"no evaluation results{f' for sweep {sweep!r}' if sweep else ''} in {store.root}: run `merg sweep` first")
    images = [_bar_charts(done, out_dir), _confusion(store, done, out_dir)] if done else []
    standard, reference = _table(done, STANDARD), _table(done, REFERENCE)
    samples = _examples(store, done, examples)
    notes = sorted({n for r in done if r["notes"] for n in r["notes"].split("; ")})
    descriptions = done[0]["metrics"]["descriptions"] if done else {}
    title = f"merg evaluation: {sweep or 'all sweeps'}"

    md = [f"# {title}", "", f"{len(done)} cells done, {len(failed)} failed. Values: mean (bootstrap 95% interval).", ""]
    md += ["## Standard definitions (reply vs reference, same pairs for every system)", "", *_md_table(*standard), ""]
    md += ["## The reference system's definitions (for comparison with its table)", "", *_md_table(*reference), ""]
    md += ["## How each number is computed", ""] + [f"- **{k}**: {v}" for k, v in descriptions.items()] + [""]
    if notes:
        md += ["## Stand-ins behind these numbers", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    md += ["## Examples", ""]
    for ex in samples:
        md += [f"**{ex['key']}**", "", *[f"> {line}" for line in ex["history"]], "",
               f"- reference ({ex['next_speaker']}): {ex['reference']}"]  # fmt: skip
        md += [f"- {system}: {reply}" for system, reply in ex["replies"].items()] + [""]
    if failed:
        md += ["## Failed cells", ""] + [f"- {r['system']} / {r['preset']} / {r['split']}: {r['error']}" for r in failed] + [""]
    markdown = out_dir / "report.md"
    markdown.write_text("\n".join(md))

    page = _html(title, len(done), len(failed), standard, reference, descriptions, notes, images, samples, failed)
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    return ReportFiles(markdown, html_path, images, len(results))


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in body]


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html(title, n_done, n_failed, standard, reference, descriptions, notes, images, samples, failed) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}img{max-width:100%}"
        "blockquote{color:#555;margin:0 0 0 1em}</style></head><body>",
        f"<h1>{e(title)}</h1><p>{n_done} cells done, {n_failed} failed. Values: mean (bootstrap 95% interval).</p>",
        "<h2>Standard definitions</h2>", _html_table(*standard),
        "<h2>The reference system's definitions</h2>", _html_table(*reference),
        "<h2>How each number is computed</h2><ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in descriptions.items()) + "</ul>",
    ]  # fmt: skip
    if notes:
        parts.append("<h2>Stand-ins behind these numbers</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Plots</h2>" + "".join(f"<img src='{e(p.name)}' alt='{e(p.stem)}'>" for p in images))
    parts.append("<h2>Examples</h2>")
    for ex in samples:
        parts.append(f"<h3>{e(ex['key'])}</h3><blockquote>" + "<br>".join(e(line) for line in ex["history"]) + "</blockquote><ul>")
        parts.append(f"<li><i>reference ({e(ex['next_speaker'])})</i>: {e(ex['reference'])}</li>")
        parts.extend(f"<li><b>{e(system)}</b>: {e(reply)}</li>" for system, reply in ex["replies"].items())
        parts.append("</ul>")
    if failed:
        parts.append("<h2>Failed cells</h2><ul>" + "".join(f"<li>{e(r['system'])} / {e(r['preset'])}: {e(str(r['error']))}</li>" for r in failed) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
