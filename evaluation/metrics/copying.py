"""Copy and degenerate-reply detection: replies that repeat the dialogue or the prompt instead of answering.

A history-based metric (reply vs dialogue history) rewards a reply that copies the history, so these
shares are shown next to the metrics and flag them where copying is common.

- copy: the longest common substring of the reply and the dialogue history (characters, lowercased,
  whitespace collapsed) covers at least `COPY_THRESHOLD` of the reply;
- scaffold: the reply starts with the prompt's own words ("Dialogue:", "Reply as ...", "System:", ...);
- empty: a blank reply; distinct: the number of different replies.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher
from typing import Sequence

import numpy as np

COPY_THRESHOLD = 0.8
SCAFFOLD = re.compile(r"^\W*(dialogue\s*:|reply as\b|how the last line sounded|system\s*:|user\s*:|assistant\s*:)", re.IGNORECASE)


def _normal(text: str) -> str:
    return " ".join((text or "").lower().split())


def copied_share(reply: str, history: Sequence[str]) -> float:
    """Longest common substring of the reply and the history, over the reply's length (0 for a blank reply)."""
    reply, context = _normal(reply), _normal("\n".join(history))
    if not reply:
        return 0.0
    match = SequenceMatcher(None, reply, context, autojunk=False).find_longest_match(0, len(reply), 0, len(context))
    return match.size / len(reply)


def copy_statistics(replies: Sequence[str], histories: Sequence[Sequence[str]]) -> dict:
    """Shares of copying, scaffold and empty replies, and the number of distinct replies."""
    empty = np.array([not _normal(r) for r in replies])
    copy = np.array([copied_share(r, h) >= COPY_THRESHOLD for r, h in zip(replies, histories)]) & ~empty
    scaffold = np.array([bool(SCAFFOLD.match(r or "")) for r in replies])
    n = max(1, len(replies))
    return dict(copy_share=float(copy.sum() / n), scaffold_share=float(scaffold.sum() / n),
                empty_share=float(empty.sum() / n), distinct_replies=len({_normal(r) for r in replies}))  # fmt: skip
