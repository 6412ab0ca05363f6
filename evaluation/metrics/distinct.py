"""Dist-n (Li et al., 2016): distinct n-grams / all n-grams, over words (lowercased, punctuation off)."""

from __future__ import annotations

import re
from typing import Sequence

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


def mean_distinct_n(replies: Sequence[str], n: int) -> float:
    """The per-reply Dist-n averaged over replies that have at least one n-gram."""
    scores = [len(set(g)) / len(g) for g in (_ngrams(word_tokens(r), n) for r in replies) if g]
    return sum(scores) / len(scores) if scores else 0.0
