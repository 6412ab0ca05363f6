"""Per-step training metrics summed over micro-batches and ranks, written by rank 0.

    logger = MetricLogger(run_dir / "metrics.jsonl", device, is_main=rank == 0, from_step=step)
    logger.add_micro_batch(out.loss_sum, out.num_tokens, real_tokens)   # every micro-batch
    record = logger.end_step(seconds)   # all-reduce: token-weighted step loss, all ranks' tokens
    logger.write({**record, ...})

Tokens/s counts real (non-pad) tokens of every rank over the slowest rank's time in training steps:
validation and checkpoint writes are not throughput.

A resumed run continues from its checkpoint's step, and replays the steps a killed run had logged
after it: those rows are dropped when the logger opens, so the file holds one row per step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the rows of steps up to `step` (and none torn by a kill mid-write), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line a kill cut short
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)


class MetricLogger:
    def __init__(self, path: Path, device: torch.device, *, is_main: bool, from_step: int = 0):
        """`from_step`: the step the run (re)starts from; rows logged past it are dropped."""
        self.device = device
        if is_main:
            drop_rows_after(Path(path), from_step)
        self.file = open(path, "a") if is_main else None
        self._step = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, target tokens, real tokens
        self.window_tokens, self.window_seconds = 0, 0.0  # since the last logged tokens/s
        self.run_tokens, self.run_seconds = 0, 0.0

    def add_micro_batch(self, loss_sum: torch.Tensor, target_tokens: int, real_tokens: int) -> None:
        self._step[0] += loss_sum.detach().double()
        self._step[1] += target_tokens
        self._step[2] += real_tokens

    def end_step(self, seconds: float) -> dict:
        """The step's loss (every target token of every rank weighed alike), its target and real
        (non-pad) tokens over all ranks; `seconds` is this rank's time in the step."""
        totals = torch.cat([self._step, self._step.new_tensor([seconds])])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals[:3])
            torch.distributed.all_reduce(totals[3:], op=torch.distributed.ReduceOp.MAX)
        loss_sum, targets, tokens, seconds = totals.tolist()
        self._step.zero_()
        self.window_tokens, self.window_seconds = self.window_tokens + int(tokens), self.window_seconds + seconds
        self.run_tokens, self.run_seconds = self.run_tokens + int(tokens), self.run_seconds + seconds
        return {"loss": loss_sum / max(1.0, targets), "target_tokens": int(targets), "real_tokens": int(tokens)}

    @property
    def tokens_per_s(self) -> float:
        return self.window_tokens / max(1e-9, self.window_seconds)

    def reset_window(self) -> None:
        self.window_tokens, self.window_seconds = 0, 0.0

    @property
    def run_tokens_per_s(self) -> float:
        return self.run_tokens / max(1e-9, self.run_seconds)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
