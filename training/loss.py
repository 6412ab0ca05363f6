"""Token-weighted loss: every target token of an optimiser step weighs the same, whichever
micro-batch or rank it falls in (HF Trainer's `num_items_in_batch` since 4.46, torchtune's recipes).

    tokens = global_target_tokens(step_batches, device)           # one all-reduce per optimiser step
    out = engine(**batch)                                          # out.loss_sum: summed NLL of this micro-batch
    engine.backward(scaled_for_engine(out.loss_sum, tokens, grad_accum, world_size))

DeepSpeed divides what `backward` gets by the accumulation steps and averages gradients over ranks;
the scaling undoes both, so the step's gradient is d(sum of every token's NLL)/d(theta) / tokens.
"""

from __future__ import annotations

import torch

from training.prompt import IGNORE_INDEX


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens a causal LM is trained to predict in `labels` (position t predicts t + 1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def global_target_tokens(local_tokens: int, device: torch.device) -> int:
    """This optimiser step's target tokens summed over ranks (every rank must call it)."""
    total = torch.tensor([local_tokens], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return int(total.item())


def scaled_for_engine(loss_sum: torch.Tensor, step_tokens: int, grad_accum: int, world_size: int) -> torch.Tensor:
    """The micro-batch's summed NLL as its share of the step's token mean, pre-multiplied by what
    DeepSpeed divides by (accumulation steps, ranks)."""
    return loss_sum * (grad_accum * world_size / max(1, step_tokens))
