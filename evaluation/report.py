"""`report(store, sweep, out_dir)`: `report.md` + `report.html` with tables, plots and examples.

Tables in the reference system's layout (Method / Model / PPL / Dist-2 / BERTScore F1 / Emotion /
Sentiment / Empathy), once with merg's standard definitions and once with the reference system's
formulas (with merg's models), each value with its bootstrap 95% interval and each column's one
meaning stated; copy and degenerate-reply statistics (history-based metrics flagged where copying is
common; cells with identical replies named); paired comparisons between cells on the same pairs
(`evaluation.compare`: two families of tests declared before the numbers, the audio+video vs text-only
question and every other pair, Holm-corrected within each, "no difference detected" where none is);
only cells with every example scored (an `eval_results` row marked done) appear; the store's emotion probe (`merg probe`); bar charts with the
intervals; the confusion of the reply's emotion against the reference reply's per system; a few
dialogues with every system's reply; and the stand-ins and gaps (zero-vector pairs) behind any number.
Markdown and HTML are rendered from the same sections.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np

from evaluation.compare import ALPHA, MODALITY, OTHERS, PAIRED_METRICS, Comparison, compare_cells, modality_comparisons
from featurestore.schema import EMOTIONS, EVAL_OUTPUTS, EVAL_RESULTS, PROBE_RESULTS, SWEEP_CELLS
from featurestore.store import Store, build_filter

STANDARD = [("PPL", "ppl"), ("Dist-1", "dist1"), ("Dist-2", "dist2"), ("BERTScore F1", "bertscore_f1"),
            ("Emotion", "emotion"), ("Sentiment", "sentiment"), ("Empathy", "empathy"),
            ("Emotion acc. (MELD label)", "emotion_accuracy"), ("Label match (ref.)", "emotion_label_match")]  # fmt: skip
REFERENCE = [("PPL (self)", "ref_self_ppl"), ("PPL (uncond. ref.)", "ref_uncond_ppl"), ("Dist-2", "dist2"),
             ("BERTScore F1", "bertscore_f1"), ("Emotion (history)", "ref_emotion"),
             ("Sentiment (history)", "ref_sentiment"), ("Empathy (history)", "ref_empathy")]  # fmt: skip
COPYING = [("Copies history", "copy_share"), ("Prompt scaffold", "scaffold_share"), ("Empty", "empty_share"),
           ("Distinct replies", "distinct_replies")]  # fmt: skip
HISTORY_BASED = {"ref_emotion", "ref_sentiment", "ref_empathy"}
COPY_FLAG = 0.2  # history-based metrics are flagged where this share of replies copies the history or the prompt
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
    """The newest cell of each (system, preset, split) of a sweep: its members (`sweep_cells`, so cells a
    renamed or overlapping sweep reused are listed), or, for stores from before membership was recorded,
    the results stored under its name. Every result when `sweep` is None."""
    members = store.read_records(SWEEP_CELLS, build_filter(sweep=sweep)).to_pylist() if sweep else []
    if members:
        by_cell = {r["cell"]: r for r in store.read_records(EVAL_RESULTS, build_filter(cell=[m["cell"] for m in members])).to_pylist()}
        rows = [dict(by_cell[m["cell"]], sweep=sweep, created_at=m["created_at"]) for m in members if m["cell"] in by_cell]
    else:
        rows = store.read_records(EVAL_RESULTS, build_filter(sweep=sweep)).to_pylist()
    rows.sort(key=lambda r: r["created_at"])
    latest = {(r["sweep"], r["system"], r["preset"], r["split"]): r for r in rows}  # the newest run of each cell
    return sorted(latest.values(), key=lambda r: (r["sweep"], Path(r["model"] or "").name.casefold(), r["system"].casefold(), r["preset"], r["split"]))


def _unfinished(store: Store, sweep: str | None, results: list[dict]) -> int:
    """Cells of the sweep's grid with no result yet (running, stopped part-way, or waiting)."""
    if not sweep:
        return 0
    members = {m["cell"] for m in store.read_records(SWEEP_CELLS, build_filter(sweep=sweep), ["cell"]).to_pylist()}
    return len(members - {r["cell"] for r in results})


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


def _confusion(outputs: dict[str, dict[str, dict]], done: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(done), figsize=(4.2 * len(done), 4.2), squeeze=False)
    for ax, result in zip(axes[0], done):
        matrix = np.zeros((len(EMOTIONS), len(EMOTIONS)))
        for row in outputs[result["cell"]].values():
            matrix[EMOTIONS.index(row["reference_emotion"]), EMOTIONS.index(row["reply_emotion"])] += 1
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(EMOTIONS)), EMOTIONS, fontsize=7)
        ax.set_xlabel("reply's emotion (both: the emotion classifier)")
        ax.set_ylabel("reference reply's emotion")
        ax.set_title(f"{result['system']} ({result['preset']})", fontsize=9)
    fig.tight_layout()
    path = out / "emotion_confusion.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _examples(outputs: dict[str, dict[str, dict]], done: list[dict], count: int) -> list[dict]:
    """A few pairs every reported cell answered: the dialogue, the reference, each system's reply.
    `outputs`: cell id -> key -> eval_outputs row."""
    common = set.intersection(*(set(outputs[r["cell"]]) for r in done)) if done else set()
    examples = []
    for key in sorted(common)[:count]:
        rows = {f"{r['system']} ({r['preset']})": outputs[r["cell"]][key] for r in done}
        row = next(iter(rows.values()))
        replies = {system: r["reply"] for system, r in rows.items()}
        examples.append(dict(key=key, history=row["history"], next_speaker=row["next_speaker"], reference=row["reference"], replies=replies))
    return examples


def _table(done: list[dict], columns: list[tuple[str, str]], flagged: set[str] = frozenset()) -> tuple[list[str], list[list[str]]]:
    """One row per cell; a value of a history-based metric gets a dagger where its cell copies a lot."""
    header = ["Method", "Model", "Modality", "Decoding", "Split", "N"] + [name for name, _ in columns]
    body = [
        [r["system"], Path(r["model"]).name, r["modality"], r["preset"], r["split"], str(r["examples"])]
        + [_fmt(r["metrics"].get(key)) + (" †" if key in HISTORY_BASED and r["cell"] in flagged else "") for _, key in columns]
        for r in done
    ]
    return header, body


def _copy_table(done: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "Decoding", "Split", "N"] + [name for name, _ in COPYING]
    body = []
    for r in done:
        m = r["metrics"]
        shares = [f"{m[k]['value']:.0%}" if k in m else "–" for _, k in COPYING[:3]]
        distinct = str(m["distinct_replies"]["value"]) if "distinct_replies" in m else "–"
        body.append([r["system"], r["preset"], r["split"], str(r["examples"]), *shares, distinct])
    return header, body


def _copies_much(result: dict) -> bool:
    m = result["metrics"]
    return m.get("copy_share", {}).get("value", 0) + m.get("scaffold_share", {}).get("value", 0) >= COPY_FLAG


def _label(result: dict) -> str:
    return f"{result['system']} ({result['preset']}/{result['split']})"


def _comparison_label(result: dict, comparison: Comparison) -> str:
    if comparison.every_preset:  # the same for every decoding preset: tested once
        return f"{result['system']} (every preset/{result['split']})"
    return _label(result)


def _comparison_table(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    header = ["A", "B", "Metric", "N", "A − B (95% interval)", "p", "p (Holm)", "Verdict"]
    body = [[_comparison_label(c.first, c), _comparison_label(c.second, c), c.metric, str(c.pairs),
             _fmt({"value": c.difference, "ci": list(c.ci)}), _fmt_p(c.p), _fmt_p(c.p_holm), c.verdict] for c in comparisons]  # fmt: skip
    return header, body


def _families(comparisons: list[Comparison]) -> list[str]:
    """The families of tests, stated before any number: what each holds and how many tests it has."""
    count = {family: sum(c.family == family for c in comparisons) for family in (MODALITY, OTHERS)}
    metrics = ", ".join(m.name for m in PAIRED_METRICS)
    return [
        f"Paired tests ({metrics}; PPL, scored on the gold reply, is the same for every decoding preset and is tested once "
        f"per pair of systems) fall into two families fixed before the numbers, each Holm-corrected on its own: "
        f"(1) \"{MODALITY}\": each trained multimodal run minus the trained text-only run of the same base model, same "
        f"pairs and decoding ({count[MODALITY]} tests); (2) {OTHERS} of the same split and decoding ({count[OTHERS]} tests). "
        "The 95% intervals, of the cells' values and of the differences, are not adjusted for multiplicity.",
    ]


def _fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _column_meanings(target: str) -> list[str]:
    reference = "the teacher model's reply (`target: teacher`)" if target == "teacher" else "MELD's real next line"
    return [
        f"**Reference** (every reply-vs-reference column): {reference}.",
        "**PPL**: exp(total NLL / total tokens) of the reference reply + EOS, teacher-forced on the prompt; a corpus ratio, its interval from resampling pairs.",
        "**Dist-1 / Dist-2**: distinct n-grams / all n-grams over all replies (corpus level; no interval, it depends on corpus size).",
        "**BERTScore F1**: reply vs reference, mean over pairs; a blank reply scores 0.",
        "**Emotion / Sentiment / Empathy**: alignment of the reply's emotion distribution (cosine) / VADER compound (1 − |Δ|) "
        "with the reference's; Empathy is their mean. Means over pairs.",
        "**Emotion acc. (MELD label)**: share of replies whose top emotion equals MELD's human label of the real next line"
        + (" — not the teacher's reference reply of the other columns." if target == "teacher" else "."),
        "**Label match (ref.)**: share of replies whose top emotion equals the classifier's top emotion of the reference reply "
        "(what the confusion plot counts).",
        "**History columns** (second table): the reference system's formulas — reply vs the mean over the dialogue-history lines, "
        "self / unconditioned PPL — computed with merg's models (BERTScore model, emotion classifier), so not comparable with the "
        "numbers of the reference system's table. † marks a cell where at least "
        f"{COPY_FLAG:.0%} of replies copy the history or the prompt: a copy scores high on these by construction.",
    ]


def _probe_section(store: Store) -> tuple[list[str], tuple[list[str], list[list[str]]] | None]:
    from evaluation.probe import probe_table

    rows = store.read_records(PROBE_RESULTS).to_pylist()
    if not rows:
        return ["No probe yet: `merg probe` fits an emotion classifier per feature of this store."], None
    return [PROBE_CONTEXT], probe_table(rows)


PROBE_CONTEXT = ("Emotion probe of the store (`merg probe`): logistic regression on each feature, trained on train, C chosen on dev, "
                 "scored on test (95% bootstrap intervals). Published MELD anchors for context: text weighted-F1 0.64–0.70, "
                 "multimodal (TelME) 0.674.")  # fmt: skip


@dataclass
class Section:
    title: str
    lines: list[str]  # paragraphs; "- " starts a bullet, "> " a quoted line
    tables: list[tuple[list[str], list[list[str]]]]
    images: list[Path]


def report(store: Store, sweep: str | None, out_dir: Path, examples: int = 3, samples: int = 1000) -> ReportFiles:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = _latest_results(store, sweep)
    done = [dict(r, metrics=json.loads(r["metrics"])) for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] != "done"]
    if not results:
        raise ValueError(f"no evaluation results{f' for sweep {sweep!r}' if sweep else ''} in {store.root}: run `merg sweep` first")
    outputs = {r["cell"]: {row["key"]: row for row in store.read_records(EVAL_OUTPUTS, build_filter(cell=r["cell"])).to_pylist()} for r in done}
    images = [_bar_charts(done, out_dir), _confusion(outputs, done, out_dir)] if done else []
    comparisons, identical = compare_cells(outputs, done, samples=samples)
    flagged = {r["cell"] for r in done if _copies_much(r)}
    notes = sorted({n for r in done if r["notes"] for n in r["notes"].split("; ")})
    descriptions = done[0]["metrics"]["descriptions"] if done else {}
    targets = sorted({r["target"] for r in done})
    title = f"merg evaluation: {sweep or 'all sweeps'}"

    unfinished = _unfinished(store, sweep, results)
    summary = [f"{len(done)} cells done, {len(failed)} failed"
               + (f", {unfinished} not finished (a cell shows once every example is scored)" if unfinished else "")
               + f"; target: {', '.join(targets) or '–'}. Each value: the metric "
               "(a mean over pairs, except PPL, a corpus ratio, and Dist-n, corpus level) with its bootstrap 95% interval. "
               f"N is small where it is small: overlapping intervals are no ranking — see the paired comparisons."]  # fmt: skip
    sections = [
        Section(title, summary + _families(comparisons), [], []),
        Section("Standard definitions (reply vs reference, same pairs for every system)", [], [_table(done, STANDARD)], []),
        Section("What each column means", [f"- {line}" for line in _column_meanings(targets[0] if len(targets) == 1 else "mixed")], [], []),
        Section("The reference system's formulas with merg's models (reply vs dialogue history; not its table's numbers)",
                [], [_table(done, REFERENCE, flagged)], []),
        Section("Copied and degenerate replies",
                ["Share of replies that copy the history (longest common substring ≥ 80% of the reply), start with the prompt's "
                 "own words, or are blank, and the number of distinct replies."]
                + [f"- † {_label(r)}: history-based metrics reward its copying" for r in done if r["cell"] in flagged]
                + [f"- {_label(a)} and {_label(b)} produced the same replies pair for pair (one result, shown twice; not compared)"
                   for a, b in identical], [_copy_table(done)], []),  # fmt: skip
        _comparisons_section([c for c in comparisons if c.family == OTHERS]),
        _modality_section(modality_comparisons(comparisons)),
        Section("Emotion probe of the store's features", *_probe_lines(store), []),
        Section("How each number is computed", [f"- **{k}**: {v}" for k, v in descriptions.items()], [], []),
    ]
    if notes:
        sections.append(Section("Stand-ins and gaps behind these numbers", [f"- {n}" for n in notes], [], []))
    sections.append(Section("Plots (bars: bootstrap 95% intervals)", [], [], images))
    sections.append(Section("Examples", _example_lines(_examples(outputs, done, examples)), [], []))
    if failed:
        sections.append(Section("Failed cells", [f"- {r['system']} / {r['preset']} / {r['split']}: {r['error']}" for r in failed], [], []))
    markdown = out_dir / "report.md"
    markdown.write_text(_markdown(sections))
    html_path = out_dir / "report.html"
    html_path.write_text(_html(sections))
    return ReportFiles(markdown, html_path, images, len(results))


def _probe_lines(store: Store) -> tuple[list[str], list]:
    lines, table = _probe_section(store)
    return lines, [table] if table else []


def _comparisons_section(comparisons: list[Comparison]) -> Section:
    significant = [c for c in comparisons if c.significant]
    lines = ["Every two cells of the same split and decoding, on the same pairs (outside the audio+video question): the difference "
             "with a paired bootstrap 95% interval (not adjusted for multiplicity) and an approximate-randomisation p-value; "
             f"Holm's correction over all tests below. Significant: Holm-adjusted p < {ALPHA}. Elsewhere: no difference detected "
             "(which is not evidence of equality)."]  # fmt: skip
    lines.append(f"{len(significant)} of {len(comparisons)} differences are significant"
                 + (": " + "; ".join(f"{c.metric}: {_label(c.first)} vs {_label(c.second)} ({c.verdict})" for c in significant) if significant else "."))
    return Section("Paired comparisons", lines, [_comparison_table(comparisons)] if comparisons else [], [])


def _modality_section(comparisons: list[Comparison]) -> Section:
    if not comparisons:
        return Section("Does audio+video help over text alone?", ["Not answerable here: no trained text-only and multimodal runs of the same base model on the same pairs."], [], [])
    lines = ["Trained multimodal run minus trained text-only run of the same base model, same pairs and decoding: a family of "
             "its own, declared before the numbers, Holm-corrected within it; intervals not adjusted for multiplicity."]
    return Section("Does audio+video help over text alone?", lines, [_comparison_table(comparisons)], [])


def _example_lines(samples: list[dict]) -> list[str]:
    lines = []
    for ex in samples:
        lines += [f"**{ex['key']}**", *[f"> {line}" for line in ex["history"]], f"- reference ({ex['next_speaker']}): {ex['reference']}"]
        lines += [f"- {system}: {reply}" for system, reply in ex["replies"].items()]
    return lines


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(cell, row)) + " |" for row in body]


def _line_kind(line: str) -> str:
    return line[:2] if line.startswith(("- ", "> ")) else "p"


def _markdown(sections: list[Section]) -> str:
    md = []
    for level, section in enumerate(sections):
        md += [f"{'#' if level == 0 else '##'} {section.title}", ""]
        for kind, group in groupby(section.lines, key=_line_kind):
            md += [*group, ""] if kind != "p" else [line for text in group for line in (text, "")]
        for table in section.tables:
            md += ["", *_md_table(*table), ""]
        md += [f"![{p.stem}]({p.name})" for p in section.images] + [""]
    return "\n".join(md)


def _inline(text: str) -> str:
    """Escaped text with markdown's **bold** and `code` as HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html(sections: list[Section]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(sections[0].title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}img{max-width:100%}"
        "blockquote{color:#555;margin:0 0 0 1em}</style></head><body>",
    ]  # fmt: skip
    for level, section in enumerate(sections):
        parts.append(f"<h{1 if level == 0 else 2}>{html.escape(section.title)}</h{1 if level == 0 else 2}>")
        for kind, group in groupby(section.lines, key=_line_kind):
            items = [_inline(line[2:] if kind != "p" else line) for line in group]
            if kind == "- ":
                parts.append("<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")
            elif kind == "> ":
                parts.append("<blockquote>" + "<br>".join(items) + "</blockquote>")
            else:
                parts.extend(f"<p>{item}</p>" for item in items)
        parts.extend(_html_table(*table) for table in section.tables)
        parts.extend(f"<img src='{html.escape(p.name)}' alt='{html.escape(p.stem)}'>" for p in section.images)
    parts.append("</body></html>")
    return "\n".join(parts)
