"""Sentiment with VADER's compound score (-1 .. 1), and alignment = 1 - |compound(a) - compound(b)|."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> np.ndarray:
    analyzer = _analyzer()
    return np.array([analyzer.polarity_scores(t or "")["compound"] for t in texts], dtype=np.float64)


def sentiment_alignment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair, in [-1, 1]: 1 when both compounds agree, -1 for opposite extremes."""
    return 1.0 - np.abs(np.asarray(a) - np.asarray(b))
