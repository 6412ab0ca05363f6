"""Dist-n (Li et al., 2016): distinct n-grams / all n-grams, over words (lowercased, punctuation off)."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

TOKENIZER = "lowercase words: [a-z0-9]+(?:'[a-z]+)?"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Corpus level: distinct n-grams over all replies / total n-grams over all replies (0 if none)."""
    grams = [g for reply in replies for g in _ngrams(word_tokens(reply), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def reply_distinct_n(replies: Sequence[str], n: int) -> np.ndarray:
    """Each reply's own Dist-n; NaN for a reply without any n-gram (it has no ratio to count)."""
    grams = (_ngrams(word_tokens(r), n) for r in replies)
    return np.array([len(set(g)) / len(g) if g else np.nan for g in grams], dtype=np.float64)


def mean_distinct_n(replies: Sequence[str], n: int) -> float:
    """The per-reply Dist-n averaged over replies that have at least one n-gram (0 if none has)."""
    scores = reply_distinct_n(replies, n)
    scores = scores[~np.isnan(scores)]
    return float(scores.mean()) if len(scores) else 0.0
