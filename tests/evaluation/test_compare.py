"""Paired comparisons: randomisation p-values, paired bootstrap intervals, Holm's correction."""

import numpy as np
import pytest

from evaluation.compare import PAIRED_METRICS, compare_cells, holm, modality_comparisons, paired_test


def _means(values) -> np.ndarray:
    return np.stack([np.asarray(values, dtype=np.float64), np.ones(len(values))], axis=1)


def test_a_clear_paired_difference_is_significant_and_noise_is_not():
    rng = np.random.default_rng(0)
    base = rng.normal(size=60)
    difference, (lo, hi), p = paired_test(_means(base + 0.5), _means(base), samples=500)
    assert difference == pytest.approx(0.5) and lo < 0.5 < hi and p < 0.01
    _, (lo, hi), p = paired_test(_means(base + rng.normal(scale=0.01, size=60)), _means(base), samples=500)
    assert lo < 0 < hi and p > 0.05


def test_perplexity_is_compared_as_a_corpus_ratio():
    nll_tokens_a = np.array([[2.0, 1], [4.0, 3]])  # exp(6/4)
    nll_tokens_b = np.array([[1.0, 1], [1.0, 1]])  # exp(1)
    difference, _, _ = paired_test(nll_tokens_a, nll_tokens_b, np.exp, samples=50)
    assert difference == pytest.approx(np.exp(1.5) - np.exp(1.0))


def test_holm_matches_the_step_down_procedure():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def _rows(replies, scores):
    return {f"k{i}": dict(reply=r, bertscore_f1=s, emotion_alignment=s, sentiment_alignment=s, reply_emotion="joy",
                          next_emotion="joy", nll=1.0 + s, tokens=2) for i, (r, s) in enumerate(zip(replies, scores))}


def test_identical_cells_are_listed_not_tested_and_modality_is_oriented_multimodal_minus_text():
    n = 30
    scores = np.linspace(0, 1, n)
    outputs = {"t": _rows([f"a{i}" for i in range(n)], scores), "m": _rows([f"b{i}" for i in range(n)], scores + 0.3),
               "same": _rows([f"a{i}" for i in range(n)], scores)}  # fmt: skip
    cell = lambda c, modality, system: dict(cell=c, system=system, modality=modality, run=f"runs/{c}", model="llm", split="test", preset="default")  # noqa: E731
    cells = [cell("t", "text", "text"), cell("m", "audio+video", "mm"), cell("same", "text", "text greedy copy")]
    comparisons, identical = compare_cells(outputs, cells, samples=200)
    assert [(a["cell"], b["cell"]) for a, b in identical] == [("t", "same")]
    bert = [c for c in modality_comparisons(comparisons) if c.metric == "BERTScore F1"]
    assert len(bert) == 2 and all(c.first["cell"] == "m" and c.difference == pytest.approx(0.3) for c in bert)
    assert all(c.significant and c.verdict == "mm higher" for c in bert)


def test_perplexity_is_tested_once_per_system_pair_and_each_family_is_corrected_on_its_own():
    """PPL is scored on the gold reply (the same for every decoding preset): one test per pair of systems, not
    one per preset. The audio+video question is a family of its own: Holm runs within each family."""
    from evaluation.compare import MODALITY, OTHERS

    n = 30
    scores = np.linspace(0, 1, n)
    outputs, cells = {}, []
    for system, modality, run, shift in (("text", "text", "runs/t", 0.0), ("mm", "audio+video", "runs/m", 0.3), ("pre", "text", None, 0.1)):
        for preset in ("default", "reference"):
            cell = f"{system}-{preset}"
            outputs[cell] = _rows([f"{cell}{i}" for i in range(n)], scores + shift)
            cells.append(dict(cell=cell, system=system, modality=modality, run=run, model="llm", split="test", preset=preset))
    comparisons, _ = compare_cells(outputs, cells, samples=200)
    ppl = [c for c in comparisons if c.metric == "PPL"]
    assert len(ppl) == 3 and all(c.every_preset for c in ppl)  # text-mm, text-pre, mm-pre: once each
    assert len(comparisons) == 3 + 3 * 2 * (len(PAIRED_METRICS) - 1)
    modality = [c for c in comparisons if c.family == MODALITY]
    assert {(c.first["system"], c.second["system"]) for c in modality} == {("mm", "text")} and len(modality) == 1 + 2 * (len(PAIRED_METRICS) - 1)
    for family in (MODALITY, OTHERS):
        members = [c for c in comparisons if c.family == family]
        assert [c.p_holm for c in members] == pytest.approx(holm([c.p for c in members]))
