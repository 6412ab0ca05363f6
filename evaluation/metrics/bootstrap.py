"""Percentile bootstrap over examples: resample the pairs, recompute the aggregate."""

from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_ci(
    n: int, statistic: Callable[[np.ndarray], float], *, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """(low, high) of `statistic(indices)` over `samples` resamples of range(n); seeded, deterministic.

    `statistic` takes an index array, so corpus-level aggregates (perplexity, Dist-n) resample whole
    examples just like means do: `bootstrap_ci(len(x), lambda i: x[i].mean())`.
    """
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(samples)], dtype=np.float64)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)
