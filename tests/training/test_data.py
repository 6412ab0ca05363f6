import numpy as np
import pytest

from featurestore.store import Store
from infra.config import TrainConfig
from training.data import DataError, Example, collate, epoch_batches, load_examples
from training.prompt import EncodedExample


def _examples(lengths):
    return [Example(f"train/dia{i}_utt0", EncodedExample([1] * n, [-100] * (n - 1) + [1], [False] * n), None) for i, n in enumerate(lengths)]


def test_epoch_batches_shard_cover_and_repeat():
    examples = _examples(np.random.default_rng(0).integers(5, 50, size=37))
    ranks = [epoch_batches(examples, batch_size=4, epoch=1, seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # equal step counts on every rank
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert set(seen) == set(range(37)) and len(seen) == 38  # one wrapped-around example pads the shards
    assert ranks[0] == epoch_batches(examples, batch_size=4, epoch=1, seed=0, rank=0, world_size=2)
    assert ranks[0] != epoch_batches(examples, batch_size=4, epoch=2, seed=0, rank=0, world_size=2)


def test_bucketing_reduces_padding():
    examples = _examples(np.random.default_rng(1).integers(5, 200, size=256))

    def padding(bucket):
        batches = epoch_batches(examples, batch_size=8, epoch=0, seed=0, bucket=bucket)
        return sum(max(len(examples[i]) for i in b) * len(b) - sum(len(examples[i]) for i in b) for b in batches)

    assert padding(True) < padding(False) / 3


def test_collate_pads_right_for_training_and_left_for_generation():
    examples = [Example("a", EncodedExample([5, 6, 7], [-100, 6, 7], [False, True, False]), np.ones(2, np.float32)),
                Example("b", EncodedExample([8], [8], [False]), np.zeros(2, np.float32))]  # fmt: skip
    right = collate(examples, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["media"].shape == (2, 2)
    left = collate(examples, pad_id=0, left_pad=True)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["media_mask"][0, 1]


def test_examples_join_embeddings_and_explain_missing_targets(dialogue_store, tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    store = Store.open(dialogue_store)
    examples = load_examples(store, TrainConfig(modality="audio"), "dev", tokenizer)
    assert len(examples) == 6 and all(e.media.shape == (32,) for e in examples)
    assert all(sum(e.encoded.media_mask) == 1 for e in examples)
    assert load_examples(store, TrainConfig(modality="text"), "dev", tokenizer)[0].media is None
    with pytest.raises(DataError, match="merg targets build --kind teacher"):
        load_examples(store, TrainConfig(target="teacher"), "dev", tokenizer)
