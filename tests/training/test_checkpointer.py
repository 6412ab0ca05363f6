"""Checkpointer: atomic saves, the latest complete checkpoint on load, every rank's RNG."""

import os
import random

import numpy as np
import torch

from training.checkpointer import Checkpointer, rng_state, set_rng_state


class FakeEngine:
    """What the checkpointer needs of a DeepSpeed engine: files in `<dir>/<tag>/`, client state back."""

    def __init__(self):
        self.saved = {}

    def save_checkpoint(self, save_dir, tag, client_state, exclude_frozen_parameters, save_latest):
        assert exclude_frozen_parameters and not save_latest  # `latest` is the checkpointer's, written last
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        torch.save(client_state, os.path.join(folder, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        path = os.path.join(load_dir, tag)
        return path, torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), weights_only=True)


def test_save_is_atomic_and_a_half_written_checkpoint_is_ignored_on_load(tmp_path):
    checkpointer = Checkpointer(FakeEngine(), tmp_path / "checkpoints", keep=2, rank=0)
    for step in (2, 4, 6):
        checkpointer.save(step, {"step": step})
    assert [p.name for p in checkpointer.tags()] == ["step-4", "step-6"]  # keep=2
    # a process killed mid-save: its folder is still `.partial` and `latest` names the previous one
    half = tmp_path / "checkpoints" / "step-8.partial"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"truncat")
    path, state = checkpointer.load()
    assert path.name == "step-6" and state == {"step": 6}
    checkpointer.save(8, {"step": 8})  # the next save replaces the stale partial folder
    assert not list((tmp_path / "checkpoints").glob("*.partial")) and checkpointer.load()[1] == {"step": 8}


def test_nothing_to_resume(tmp_path):
    assert Checkpointer(FakeEngine(), tmp_path / "none", keep=1, rank=0).load() is None


def test_rng_of_every_generator_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_each_rank_restores_its_own_rng(tmp_path):
    """Ranks draw different amounts of dropout noise, so each saves and restores its own generators."""
    folder = tmp_path / "checkpoints"
    torch.manual_seed(0)
    Checkpointer(FakeEngine(), folder, keep=1, rank=0).save(2, {"step": 2})
    expected = {0: torch.rand(1).item()}
    torch.manual_seed(1)  # what rank 1 of the same save writes
    torch.save(rng_state(), folder / "step-2" / "rng-rank1.pt")
    expected[1] = torch.rand(1).item()
    for rank in (0, 1):
        torch.manual_seed(99)
        Checkpointer(FakeEngine(), folder, keep=1, rank=rank).load()
        assert torch.rand(1).item() == expected[rank]
