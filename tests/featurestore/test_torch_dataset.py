from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from featurestore.store import Store
from featurestore.synthetic import synthetic_utterances

DIM = 8


def _store(tmp_path, n=23):
    store = Store.open(tmp_path / "s", create=True, embedding_dim=DIM)
    store.write_utterances(synthetic_utterances(n, DIM, seed=0, modalities=False))
    return store


def test_shards_cover_everything_once_and_equal_length(tmp_path):
    store = _store(tmp_path, n=23)
    shards = [
        [row["key"] for row in store.torch_dataset(seed=3, rank=r, world_size=3, columns=["emotion_id"])]
        for r in range(3)
    ]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 8  # ceil(23 / 3), padded by wrapping
    flat = [k for s in shards for k in s]
    assert set(flat) == set(store.keys()) and len(flat) == 24


def test_shuffle_is_deterministic_and_changes_per_epoch(tmp_path):
    store = _store(tmp_path)
    a = store.torch_dataset(seed=1, columns=["fused_emb"])
    b = store.torch_dataset(seed=1, columns=["fused_emb"])
    first = [r["key"] for r in a]
    assert first == [r["key"] for r in b]
    a.set_epoch(1)
    assert sorted(r["key"] for r in a) == sorted(first) and [r["key"] for r in a] != first
    unshuffled = [r["key"] for r in store.torch_dataset(shuffle=False, columns=["fused_emb"])]
    assert unshuffled == sorted(unshuffled)


def test_yields_tensors_and_batches_with_dataloader(tmp_path):
    store = _store(tmp_path)
    dataset = store.torch_dataset(columns=["fused_emb", "emotion_id"], split=["train", "dev", "test"])
    row = next(iter(dataset))
    assert row["fused_emb"].shape == (DIM,) and row["fused_emb"].dtype == torch.float32
    assert row["emotion_id"].dtype == torch.int32
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["fused_emb"].shape == (4, DIM) and len(batch["key"]) == 4
    keys = [k for b in DataLoader(dataset, batch_size=5, num_workers=2) for k in b["key"]]
    assert sorted(keys) == sorted(store.keys())
