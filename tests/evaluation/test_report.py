"""The report from stored results: sweep membership, one meaning per column, paired comparisons, copy
statistics, and the HTML as a real headless browser renders it."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from evaluation import report
from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS, PROBE_RESULTS, SWEEP_CELLS
from featurestore.store import Store

KEYS = [f"test/dia{i}_utt0" for i in range(40)]
HISTORY = ["Rachel: I got the job at the museum!", "Ross: No way, that is amazing."]


def _cell(store: Store, cell: str, system: str, modality: str, replies: list[str], score: float, preset: str = "default"):
    rng = np.random.default_rng(len(cell))
    bert = np.clip(score + rng.normal(scale=0.05, size=len(KEYS)), 0, 1)
    store.write_records(EVAL_OUTPUTS, [
        dict(id=f"{cell}:{k}", cell=cell, key=k, history=HISTORY, next_speaker="Rachel", reference="I am so proud of me.",
             reply=r, next_emotion="joy", reply_emotion="joy", reference_emotion="joy", nll=2.0, tokens=4, bertscore_f1=float(b),
             emotion_alignment=float(b), sentiment_alignment=0.5, emotion_alignment_history=0.9, sentiment_alignment_history=0.9)
        for k, r, b in zip(KEYS, replies, bert)])  # fmt: skip
    from evaluation.metrics.copying import copy_statistics

    copying = copy_statistics(replies, [HISTORY] * len(replies))
    metric = lambda v: {"value": float(v), "ci": [float(v) - 0.05, float(v) + 0.05]}  # noqa: E731
    metrics = {k: metric(bert.mean()) for k in ("ppl", "dist1", "dist2", "bertscore_f1", "emotion", "sentiment", "empathy",
                                                "emotion_accuracy", "emotion_label_match", "ref_self_ppl", "ref_uncond_ppl",
                                                "ref_emotion", "ref_sentiment", "ref_empathy")}  # fmt: skip
    metrics.update({k: {"value": v} for k, v in copying.items()}, descriptions={"bertscore": "test"})
    store.write_records(EVAL_RESULTS, [dict(cell=cell, sweep="old-name", system=system, model="/m/llm", modality=modality,
                                            run=f"runs/{cell}" if system != "pretrained" else None, preset=preset, split="test",
                                            target="teacher", status="done", examples=len(KEYS), metrics=json.dumps(metrics))])  # fmt: skip
    store.write_records(SWEEP_CELLS, [dict(id=f"renamed:{cell}", sweep="renamed", cell=cell, system=system, preset=preset, split="test")])


@pytest.fixture
def reported(eval_store, tmp_path):
    store = Store.open(eval_store)
    _cell(store, "c-text", "QLoRA text-only", "text", [f"Congratulations number {i}!" for i in range(40)], 0.4)
    _cell(store, "c-mm", "QLoRA multimodal", "audio+video", [f"Wow, well done {i}!" for i in range(40)], 0.6)
    copy = "Dialogue: Rachel: I got the job at the museum! Ross: No way, that is amazing."
    _cell(store, "c-pre", "pretrained", "text", [copy] * 40, 0.5)
    _cell(store, "c-same", "pretrained", "text", [copy] * 40, 0.5, preset="reference")
    _cell(store, "c-same2", "pretrained twin", "text", [copy] * 40, 0.5, preset="reference")
    score = {"value": 0.3, "ci": [0.2, 0.4]}
    probe_metrics = dict(C=1.0, test={"weighted_f1": score, "accuracy": score}, majority={"weighted_f1": score, "accuracy": score},
                         per_class_f1={"neutral": 0.5})  # fmt: skip
    store.write_records(PROBE_RESULTS, [dict(id="p1", feature="fused_emb", encoder="imagebind", status="done",
                                             sizes=json.dumps({"train": 48, "dev": 8, "test": 8}), metrics=json.dumps(probe_metrics))])  # fmt: skip
    return report(store, "renamed", tmp_path / "report", samples=200)


def test_report_lists_a_sweeps_members_with_comparisons_and_copy_statistics(reported):
    markdown = reported.markdown.read_text()
    assert reported.cells == 5  # stored under another sweep name, listed through sweep_cells
    assert "Emotion acc. (MELD label)" in markdown and "not the teacher's reference reply" in markdown
    assert "not comparable with the numbers of the reference system's table" in markdown
    assert "## Paired comparisons" in markdown and "no difference detected" in markdown
    # the families are declared in the summary, before any table, with the multiplicity caveat
    families = markdown.index("fall into two families fixed before the numbers")
    assert families < markdown.index("| Method |") and "not adjusted for multiplicity" in markdown[:markdown.index("| Method |")]
    assert "| pretrained (every preset/test) |" in markdown or "(every preset/test) | pretrained" in markdown  # PPL once
    assert "QLoRA multimodal higher" in markdown  # 0.6 vs 0.4 on 40 pairs
    section = markdown.split("## Does audio+video help over text alone?")[1].split("##")[0]
    assert "| QLoRA multimodal (default/test) | QLoRA text-only (default/test) | BERTScore F1 |" in section
    assert "† pretrained (default/test): history-based metrics reward its copying" in markdown
    assert "produced the same replies pair for pair" in markdown
    assert "| pretrained | default | test | 40 | 100% | 100% | 0% | 1 |" in markdown  # copies, scaffold, empty, distinct
    assert "| fused_emb | imagebind | 48/8/8 | 1 | 0.300 (0.200–0.400) |" in markdown and "TelME" in markdown


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (infra/setup.sh installs Debian's package)")
def test_report_html_renders_in_headless_chromium_with_every_image_loaded(reported, tmp_path):
    """Chromium's own `--headless --dump-dom` after load: a marker script (on a copy of the page) counts
    images that failed to decode; `--screenshot` must not be blank."""
    from PIL import Image

    page = reported.html.read_text()
    probe_page = reported.html.with_name("browser-check.html")
    probe_page.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => { const bad = [...document.images]"
                                       ".filter(i => !i.complete || i.naturalWidth === 0).length; document.body.insertAdjacentHTML("
                                       "'beforeend', `<p id='merg-check'>images=${document.images.length} broken=${bad}</p>`); });"
                                       "</script></body>"))  # fmt: skip
    flags = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", probe_page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f"images={len(reported.images)} broken=0" in dom, dom[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", reported.html.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005  # text, tables and plots, not a blank page
