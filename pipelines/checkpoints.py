"""Strict checkpoint loading for every model merg ships the architecture of (ImageBind, TalkNet, S3FD).

A user's checkpoint must fit exactly: every key, every shape. A leading `module.` (DataParallel) is
stripped and a `{"model": state_dict}` wrapper unwrapped; anything else that does not fit raises
`CheckpointMismatch` naming the missing, unexpected and mis-shaped tensors, rather than loading half
a model silently (the official TalkNet loader skips what does not fit).
"""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointMismatch(ValueError):
    pass


def _show(keys: list[str], detail=lambda k: k) -> str:
    return ", ".join(detail(k) for k in keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def load_strict(model: torch.nn.Module, path: Path | str, name: str, mmap: bool = False) -> None:
    """Load `path` into `model` (weights only), or raise CheckpointMismatch saying what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = [
            f"{len(missing)} missing: {_show(missing)}" if missing else "",
            f"{len(unexpected)} unexpected: {_show(unexpected)}" if unexpected else "",
            f"{len(wrong)} of the wrong shape: "
            + _show(wrong, lambda k: f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}") if wrong else "",
        ]  # fmt: skip
        raise CheckpointMismatch(f"{path} does not fit {name} ({len(expected)} tensors): " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)
