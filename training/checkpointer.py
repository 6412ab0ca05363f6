"""Resumable checkpoints and the run's weights, for DeepSpeed ZeRO stages 0-3.

    checkpointer = Checkpointer(engine, run_dir / "checkpoints", keep=2, rank=rank)
    checkpointer.save(step, state)          # atomic: a folder appears complete or not at all
    state = checkpointer.load()             # None when there is nothing to resume
    save_trained_weights(engine, run_dir)   # every rank calls it: ZeRO-3 gathers partitioned tensors

A save writes `step-N.partial/` (DeepSpeed's files + one RNG file per rank), then rank 0 renames it to
`step-N/` and atomically replaces `latest`; a process killed mid-save leaves a `.partial` folder
that `load()` never reads and the next save removes. The RNG of every device of every rank (Python,
NumPy, torch CPU, CUDA) is saved per rank, since ranks draw different amounts of dropout noise.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from training.mllm import save_weights

LATEST = "latest"
PARTIAL = ".partial"


def rng_state() -> dict:
    """This process's random generators as tensors and lists (loadable with `weights_only=True`)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(
        python=[version, list(mt), gauss], numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        torch=torch.get_rng_state(),
    )  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class Checkpointer:
    def __init__(self, engine, folder: Path, *, keep: int, rank: int):
        self.engine, self.folder, self.keep, self.rank = engine, Path(folder), keep, rank

    def tags(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        done = [p for p in self.folder.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL)]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def save(self, step: int, client_state: dict) -> Path:
        tag = f"step-{step}"
        partial = self.folder / (tag + PARTIAL)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        self.engine.save_checkpoint(
            str(self.folder), tag=tag + PARTIAL, client_state=client_state, exclude_frozen_parameters=True,
            save_latest=False,
        )  # fmt: skip
        torch.save(rng_state(), partial / f"rng-rank{self.rank}.pt")
        _barrier()  # every rank's files are written
        final = self.folder / tag
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            (self.folder / (LATEST + PARTIAL)).write_text(tag)
            os.replace(self.folder / (LATEST + PARTIAL), self.folder / LATEST)
            for old in self.tags()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.folder.glob(f"step-*{PARTIAL}"):  # left by a killed save
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        return final

    def load(self) -> tuple[Path, dict] | None:
        """Model, optimizer and scheduler into the engine from the latest complete checkpoint; returns
        its folder and client state, and restores this rank's RNG. None when there is none."""
        latest = self.folder / LATEST
        tag = latest.read_text().strip() if latest.is_file() else None
        if tag is None or not (self.folder / tag).is_dir():
            return None
        path, state = self.engine.load_checkpoint(str(self.folder), tag=tag, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {self.folder / tag}")
        rng = self.folder / tag / f"rng-rank{self.rank}.pt"
        if rng.is_file():  # resuming on fewer ranks than saved keeps rank-wise RNG where it can
            set_rng_state(torch.load(rng, weights_only=True))
        return self.folder / tag, state


def save_trained_weights(engine, run_dir: Path, *, rank: int) -> None:
    """The adapter and projector with their full shapes. Every rank must call it: under ZeRO-3 the
    trainable tensors are partitioned (a rank holds a slice, or nothing) and are gathered first."""
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        import deepspeed

        params = [p for p in engine.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                save_weights(engine.module, run_dir)
        _barrier()
    elif rank == 0:
        save_weights(engine.module, run_dir)
