"""A run's step plan: how many optimiser steps it takes on N processes, and when it warms up, validates
and saves. `train.warmup_steps`, `train.eval_every` and `train.save_every` are steps (an int) or a
fraction of the run (a float below 1), so one config fits any number of GPUs.

    plan = plan_steps(config.train, pairs=6910, world_size=8)
    plan.total_steps, plan.warmup_steps, plan.eval_every, plan.save_every
    plan.problems()   # what the plan will not do mid-run, in words (empty when it fits)

The step count follows the trainer's data: every rank gets ceil(pairs / world_size) examples (the store
dataset pads the shards to the same count), in ceil(that / batch_size) batches, `grad_accum` of them
per optimiser step, `epochs` times (or `max_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.config import TrainConfig

WARMUP_SHARE_LIMIT = 0.2  # a warm-up longer than this share of the run is flagged


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def in_steps(value: int | float, total_steps: int) -> int:
    """A plan setting in steps: an int as given, a fraction of the run rounded (at least 1 unless 0)."""
    if isinstance(value, int):
        return value
    return max(1, round(value * total_steps)) if value > 0 else 0


@dataclass(frozen=True)
class StepPlan:
    world_size: int
    batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    save_every: int
    patience: int | None

    @property
    def validations(self) -> int:
        """Validations in the run (every `eval_every` steps, and one at the end)."""
        return self.total_steps // self.eval_every + (self.total_steps % self.eval_every > 0)

    def problems(self) -> list[str]:
        """What this plan will not do mid-run: no checkpoint before the end (a crash loses the run), no
        validation before the end, too few validations for early stopping, a warm-up of much of the run."""
        found = []
        if self.save_every >= self.total_steps:
            found.append(f"save_every {self.save_every} >= {self.total_steps} steps: no checkpoint before the end")
        if self.eval_every >= self.total_steps:
            found.append(f"eval_every {self.eval_every} >= {self.total_steps} steps: no validation before the end")
        if self.patience is not None and self.validations <= self.patience:
            found.append(f"{self.validations} validation(s) cannot stop early (patience {self.patience})")
        if self.warmup_steps > WARMUP_SHARE_LIMIT * self.total_steps:
            found.append(f"warm-up of {self.warmup_steps} steps is {self.warmup_steps / self.total_steps:.0%} of the run")
        return found

    def describe(self) -> str:
        return (
            f"{self.total_steps} steps ({self.steps_per_epoch} per epoch on {self.world_size} process(es)); warm-up "
            f"{self.warmup_steps}, validation every {self.eval_every}, checkpoint every {self.save_every}"
        )


def plan_steps(t: TrainConfig, pairs: int, world_size: int) -> StepPlan:
    """The step plan of training `t` on `pairs` examples in `world_size` processes."""
    batches = _ceil(_ceil(pairs, world_size), t.batch_size)
    steps_per_epoch = _ceil(batches, t.grad_accum)
    total = max(1, t.max_steps or steps_per_epoch * t.epochs)
    return StepPlan(
        world_size=world_size, batches_per_epoch=batches, steps_per_epoch=steps_per_epoch, total_steps=total,
        warmup_steps=in_steps(t.warmup_steps, total), eval_every=in_steps(t.eval_every, total),
        save_every=in_steps(t.save_every, total), patience=t.patience,
    )  # fmt: skip
