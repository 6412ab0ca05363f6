"""Training data from the store: targets joined with the utterance embeddings, tokenised once,
sharded by rank through the store's torch dataset, batched by similar length.

    examples = load_examples(store, train_config, "train", tokenizer)
    for batch_indices in epoch_batches(examples, batch_size=8, epoch=0, seed=0, rank=0, world_size=1):
        batch = collate([examples[i] for i in batch_indices], pad_id)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from featurestore.store import Store
from featurestore.torch_dataset import StoreDataset
from infra.config import TrainConfig
from training.prompt import IGNORE_INDEX, EncodedExample, encode_example

log = logging.getLogger(__name__)

BUCKET_BATCHES = 32  # length-sort within windows of this many batches: little padding, still shuffled


class DataError(ValueError):
    pass


@dataclass
class Example:
    key: str
    encoded: EncodedExample
    media: np.ndarray | None  # the utterance's embedding; zeros where its clip had none

    def __len__(self) -> int:
        return len(self.encoded)


def load_examples(
    store: Store, config: TrainConfig, split: str, tokenizer, limit: int | None = None,
    targets_version: int | str | None = None,
) -> list[Example]:  # fmt: skip
    """Tokenised examples of `split` (targets table at `targets_version`, else the latest), sorted by key.
    Raises DataError saying what to run when absent."""
    columns = ["key", "history", "next_speaker", "target"]
    targets = store.targets(config.target, split=split, columns=columns, version=targets_version)
    if targets.num_rows == 0:
        raise _no_targets(store, config, split)
    if limit:
        targets = targets.slice(0, limit)
    media = _media_by_key(store, config, split, targets) if config.embedding_column else None
    soft_tokens = config.soft_tokens if media is not None else 0
    examples = []
    for key, history, speaker, target in zip(*(targets.column(c).to_pylist() for c in ("key", "history", "next_speaker", "target"))):
        encoded = encode_example(
            tokenizer, history, speaker, target,
            system=config.system_prompt, soft_tokens=soft_tokens, max_length=config.max_length,
        )  # fmt: skip
        examples.append(Example(key, encoded, None if media is None else media[key]))
    if shortened := sum(e.encoded.history_dropped > 0 for e in examples):
        log.info("%d of %d %s examples lost their oldest history lines to fit max_length %d", shortened, len(examples), split, config.max_length)
    return examples


def require_data(store: Store, config: TrainConfig, split: str, targets_version: int | str | None = None) -> None:
    """DataError (saying what to run) when the store lacks the targets or the embeddings that training on
    `split` needs; cheap, so that a run without its data stops before any model loads."""
    if store.targets(config.target, split=split, columns=["key"], version=targets_version).num_rows == 0:
        raise _no_targets(store, config, split)
    column = config.embedding_column
    if column and not store.query(split=split, where=f"{column} IS NOT NULL", columns=["key"], limit=1).num_rows:
        raise _no_media(store, config, split)


def _no_targets(store: Store, config: TrainConfig, split: str) -> DataError:
    return DataError(
        f"no {config.target!r} targets for split {split!r} in the store at {store.root}; "
        f"build them with `merg targets build --kind {config.target} --store {store.root}`"
    )


def _no_media(store: Store, config: TrainConfig, split: str) -> DataError:
    return DataError(
        f"modality {config.modality!r} needs {config.embedding_column}, but no {split} utterance in the store at "
        f"{store.root} has one (was it built with --no-media?). Train the text-only baseline with "
        f"`--set train.modality=text`, or preprocess the clips first."
    )


def _media_by_key(store: Store, config: TrainConfig, split: str, targets: pa.Table) -> dict[str, np.ndarray]:
    column = config.embedding_column
    by_key = store.vectors(column, split=split)
    if not by_key:
        raise _no_media(store, config, split)
    keys = targets.column("key").to_pylist()
    if missing := sum(k not in by_key for k in keys):
        # the same pairs for every system: an utterance without a clip keeps its example with a zero vector
        log.warning("%d of %d %s examples have no %s; they get a zero vector", missing, len(keys), split, column)
    zero = np.zeros_like(next(iter(by_key.values())))
    return {k: by_key.get(k, zero) for k in keys}


def epoch_batches(
    examples: list[Example], *, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
    bucket: bool = True,
) -> list[list[int]]:  # fmt: skip
    """This rank's batches for `epoch`: the store dataset's seeded permutation and rank shard (every
    rank gets the same count), then length-sorted within windows, then the batch order shuffled."""
    keys = pa.table({"key": [e.key for e in examples]})
    dataset = StoreDataset(keys, shuffle=True, seed=seed, rank=rank, world_size=world_size)
    dataset.set_epoch(epoch)
    order = dataset.indices()
    if not bucket:
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i]))
        batches += [list(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
    np.random.default_rng([seed, epoch]).shuffle(batches)  # same on every rank: equal step counts
    return [list(map(int, b)) for b in batches]


def collate(examples: list[Example], pad_id: int, *, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest example (right for training, left for generation); mask padding out."""
    width = max(len(e) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    media_mask = torch.zeros((n, width), dtype=torch.bool)
    for row, example in enumerate(examples):
        e = example.encoded
        span = slice(width - len(e), width) if left_pad else slice(0, len(e))
        input_ids[row, span] = torch.tensor(e.input_ids)
        labels[row, span] = torch.tensor(e.labels)
        attention_mask[row, span] = 1
        media_mask[row, span] = torch.tensor(e.media_mask)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, media_mask=media_mask)
    if examples[0].media is not None:
        batch["media"] = torch.from_numpy(np.stack([e.media for e in examples]))
    return batch
