"""Perplexity: teacher-forced, token-averaged over the whole test set.

    nll, tokens = token_nll(model, batch)       # per example: summed NLL of the labelled tokens, count
    perplexity(all_nll, all_tokens)             # exp(sum NLL / sum tokens)

The same two functions give the reference system's labelled variants: `ref_self_ppl` scores a
model's own first generated sentence with no context, `ref_uncond_ppl` the gold reply with no context.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    tokens = sum(token_counts)
    if tokens == 0:
        return float("nan")
    return math.exp(sum(nll_sums) / tokens)


@torch.no_grad()
def token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed NLL of the labelled next tokens and their count (logits[:, t] predicts labels[:, t+1])."""
    return aligned_nll(logits[:, :-1], labels[:, 1:], ignore_index)


@torch.no_grad()
def aligned_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed NLL of `targets` under `logits` (already aligned, no shift) and the count scored."""
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(targets.shape)
    mask = targets != ignore_index
    return (nll * mask).sum(dim=1), mask.sum(dim=1)
