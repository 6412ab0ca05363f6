"""Paired comparisons between systems scored on the same pairs.

    comparisons = compare_cells(outputs_by_cell, cells, samples=1000, seed=0)

For every two cells of the same split and decoding preset, and each per-pair metric, the difference
(first minus second) with a paired bootstrap 95% interval and an approximate-randomisation p-value
(each pair's two values swapped at random, Noreen 1989). Perplexity is teacher-forced on the gold
reply, the same for every decoding preset, so it is tested once per pair of systems (on the first
preset's cells), not once per preset. Tests fall into two families, fixed before any number is seen:
`MODALITY` ("does audio+video help over text alone?": a trained multimodal run against the trained
text-only run of the same base model) and `OTHERS` (every other pair of cells); Holm's correction runs
within each family (with enough randomisation rounds that the smallest p can pass it). A difference is
called significant only when its Holm-adjusted p < `ALPHA`; otherwise "no difference detected" (not
"equal"). The intervals are not adjusted for multiplicity. Cells whose replies are identical pair for
pair are not tested.

Every metric is a ratio of sums over pairs, f(sum num / sum den): a mean has den = 1, perplexity is
exp(sum NLL / sum tokens), so the corpus-level PPL is resampled and swapped like the means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

ALPHA = 0.05
MODALITY = "does audio+video help over text alone?"
OTHERS = "every other pair of cells"


@dataclass(frozen=True)
class PairedMetric:
    name: str
    key: str
    per_pair: Callable[[dict], tuple[float, float]]  # an eval_outputs row -> (numerator, denominator)
    transform: Callable[[np.ndarray], np.ndarray] = lambda ratio: ratio


PAIRED_METRICS = [
    PairedMetric("BERTScore F1", "bertscore_f1", lambda r: (r["bertscore_f1"], 1.0)),
    PairedMetric("Emotion", "emotion", lambda r: (r["emotion_alignment"], 1.0)),
    PairedMetric("Sentiment", "sentiment", lambda r: (r["sentiment_alignment"], 1.0)),
    PairedMetric("Emotion acc.", "emotion_accuracy", lambda r: (float(r["reply_emotion"] == r["next_emotion"]), 1.0)),
    PairedMetric("PPL", "ppl", lambda r: (r["nll"], r["tokens"]), np.exp),
]


@dataclass
class Comparison:
    first: dict  # eval_results rows
    second: dict
    metric: str
    pairs: int
    difference: float  # first minus second
    ci: tuple[float, float]
    p: float
    p_holm: float = float("nan")
    family: str = OTHERS
    every_preset: bool = False  # a metric the decoding does not change (PPL), tested once for all presets

    @property
    def significant(self) -> bool:
        return self.p_holm < ALPHA

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "no difference detected"
        return f"{self.first['system']} {'higher' if self.difference > 0 else 'lower'}"


def paired_test(
    first: np.ndarray, second: np.ndarray, transform=lambda x: x, *, samples: int = 1000, seed: int = 0
) -> tuple[float, tuple[float, float], float]:
    """(difference, bootstrap 95% interval, randomisation p) of transform(sum num / sum den) between two
    systems; `first`, `second`: (n, 2) arrays of each pair's numerator and denominator. `samples`
    randomisation rounds; the interval from min(samples, 2000) bootstrap resamples."""
    rng = np.random.default_rng(seed)
    n = len(first)

    def stat(sums_a: np.ndarray, sums_b: np.ndarray) -> np.ndarray:  # (..., 2) sums -> difference
        return transform(sums_a[..., 0] / sums_a[..., 1]) - transform(sums_b[..., 0] / sums_b[..., 1])

    observed = float(stat(first.sum(0), second.sum(0)))
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(samples, 2000)).astype(np.float64)  # bootstrap weights
    boot = stat(counts @ first, counts @ second)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    delta, extreme = second - first, 0
    for start in range(0, samples, _CHUNK):  # swap each pair's two values at random, in chunks (memory)
        swap = (rng.random((min(_CHUNK, samples - start), n)) < 0.5).astype(np.float64)
        shifted = swap @ delta
        extreme += int((np.abs(stat(first.sum(0) + shifted, second.sum(0) - shifted)) >= abs(observed) - 1e-12).sum())
    p = float((extreme + 1) / (samples + 1))
    return observed, (float(lo), float(hi)), p


_CHUNK = 2000


def randomisation_rounds(tests: int, samples: int) -> int:
    """Enough rounds that the smallest p (1 / (rounds + 1)) can pass Holm's first threshold ALPHA / tests
    by a factor of 10; at least `samples`."""
    return max(samples, int(np.ceil(10 * tests / ALPHA)))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def identical_replies(outputs_by_cell: dict[str, dict[str, dict]], a: str, b: str) -> bool:
    rows_a, rows_b = outputs_by_cell[a], outputs_by_cell[b]
    return rows_a.keys() == rows_b.keys() and all(rows_a[k]["reply"] == rows_b[k]["reply"] for k in rows_a)


def _modality_pair(first: dict, second: dict) -> bool:
    """Trained runs of the same base model, one text-only, the other with audio and/or video."""
    pair = {first["modality"], second["modality"]}
    return bool(first["run"] and second["run"] and first["model"] == second["model"] and "text" in pair and len(pair) == 2)


def compare_cells(
    outputs_by_cell: dict[str, dict[str, dict]], cells: list[dict], *, samples: int = 1000, seed: int = 0
) -> tuple[list[Comparison], list[tuple[dict, dict]]]:
    """Every comparison (Holm-adjusted within its family) and the pairs of cells skipped as identical.
    `outputs_by_cell`: cell id -> key -> eval_outputs row; `cells`: eval_results rows. A modality pair is
    oriented multimodal first."""
    jobs, identical, tested_once = [], [], set()
    for i, first in enumerate(cells):
        for second in cells[i + 1 :]:
            if (first["split"], first["preset"]) != (second["split"], second["preset"]):
                continue
            if identical_replies(outputs_by_cell, first["cell"], second["cell"]):
                identical.append((first, second))
                continue
            keys = sorted(outputs_by_cell[first["cell"]].keys() & outputs_by_cell[second["cell"]].keys())
            if len(keys) < 2:
                continue
            family = MODALITY if _modality_pair(first, second) else OTHERS
            a, b = (second, first) if family == MODALITY and first["modality"] == "text" else (first, second)
            for metric in PAIRED_METRICS:
                if metric.key in PRESET_FREE:
                    systems = (a["split"], *sorted((a["system"], b["system"])), metric.key)
                    if systems in tested_once:
                        continue
                    tested_once.add(systems)
                jobs.append((a, b, metric, keys, family))
    comparisons = []
    for family in (MODALITY, OTHERS):
        members = [job for job in jobs if job[4] == family]
        rounds = randomisation_rounds(len(members), samples)
        tests = []
        for first, second, metric, keys, _ in members:
            a, b = (np.array([metric.per_pair(outputs_by_cell[c["cell"]][k]) for k in keys], dtype=np.float64) for c in (first, second))
            difference, ci, p = paired_test(a, b, metric.transform, samples=rounds, seed=seed)
            tests.append(Comparison(first, second, metric.name, len(keys), difference, ci, p, family=family,
                                    every_preset=metric.key in PRESET_FREE))  # fmt: skip
        for comparison, adjusted in zip(tests, holm([c.p for c in tests])):
            comparison.p_holm = adjusted
        comparisons += tests
    return comparisons, identical


PRESET_FREE = {"ppl"}  # teacher-forced on the gold reply: the decoding preset does not change it


def modality_comparisons(comparisons: list[Comparison]) -> list[Comparison]:
    """The family answering the reference work's question, "does audio+video help over text alone?"."""
    return [c for c in comparisons if c.family == MODALITY]
