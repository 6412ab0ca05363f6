"""Training fixtures: a small store of dialogues with targets, and a tiny Llama with SmolLM2's tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from featurestore.store import Store
from featurestore.synthetic import synthetic_utterances
from infra.config import MergConfig, PathsConfig, TargetsConfig, TrainConfig
from infra.models import ModelNotFound, resolve_llm

DIM = 32
LINES = ["I got the job!", "That is wonderful news.", "I lost my keys again.", "Oh no, not again.",
         "We are moving to Paris.", "I will miss you so much."]  # fmt: skip


def dialogue_rows(dialogues: int, turns: int, dim: int = DIM, splits: tuple = ("train",) * 12 + ("dev", "dev", "test", "test")) -> pa.Table:
    """`dialogues` x `turns` utterances with real keys, short texts and unit-norm embeddings."""
    n = dialogues * turns
    table = synthetic_utterances(n, dim, seed=3)
    dialogue = np.arange(n) // turns
    split = [splits[d % len(splits)] for d in dialogue]
    keys = [f"{s}/dia{d}_utt{u}" for s, d, u in zip(split, dialogue, np.arange(n) % turns)]
    replace = {
        "key": pa.array(keys), "split": pa.array(split), "dialogue_id": pa.array(dialogue, pa.int32()),
        "utterance_id": pa.array(np.arange(n) % turns, pa.int32()),
        "text": pa.array([LINES[i % len(LINES)] for i in range(n)]),
    }  # fmt: skip
    for name, column in replace.items():
        table = table.set_column(table.column_names.index(name), name, column)
    return table


@pytest.fixture(scope="session")
def dialogue_store(tmp_path_factory) -> Path:
    """16 dialogues x 4 turns (12 train, 2 dev, 2 test) with next_utterance targets."""
    from training import build_targets

    root = tmp_path_factory.mktemp("train-store")
    store = Store.open(root, create=True, embedding_dim=DIM)
    store.write_utterances(dialogue_rows(16, 4))
    build_targets(store, TargetsConfig(kind="next_utterance"), Path("."))
    return root


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return resolve_llm("smollm2-135m-instruct", PathsConfig().model_cache)
    except ModelNotFound as exc:
        pytest.skip(f"{exc}")


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory, smollm2) -> Path:
    """A 2-layer, 64-wide Llama (random init, seeded) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, initializer_range=0.3,  # larger than 0.02 so a few steps can move the loss
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_config(store: Path, runs: Path, model: Path, **train: object) -> MergConfig:
    settings = dict(name="tiny", model=str(model), max_steps=4, batch_size=4, eval_every=2, save_every=2,
                    log_every=1, max_length=128, warmup_steps=1, lora={"r": 4, "alpha": 8})  # fmt: skip
    settings.update(train)
    return MergConfig(paths=PathsConfig(store=store, runs=runs), train=TrainConfig(**settings))
