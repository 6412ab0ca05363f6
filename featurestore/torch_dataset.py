"""A torch `IterableDataset` over store rows, for training: deterministic shuffle, rank sharding.

Every rank sees the same permutation (seeded by `seed + epoch`) and takes every `world_size`-th
row of it, padded by wrapping around so that all ranks yield the same number of rows, as
`DistributedSampler` does. DataLoader workers split a rank's share again. Rows are sorted by key
before shuffling, so the order does not depend on how Lance laid the data out.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info


class StoreDataset(IterableDataset):
    def __init__(
        self,
        table: pa.Table,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if "key" not in table.column_names:
            raise ValueError("the table needs its key column")
        self.table = table.sort_by("key")
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch for a new (still deterministic) order."""
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """The row indices this rank yields this epoch (before DataLoader-worker splitting)."""
        n = self.table.num_rows
        order = np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else np.arange(n)
        per_rank = -(-n // self.world_size) if n else 0
        padded = np.resize(order, per_rank * self.world_size) if n else order
        return padded[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.indices())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        indices = self.indices()
        worker = get_worker_info()
        if worker is not None:
            indices = indices[worker.id :: worker.num_workers]
        columns = {name: _column_values(self.table.column(name)) for name in self.table.column_names}
        for i in indices:
            yield {name: values[i] for name, values in columns.items()}


def _column_values(column: pa.ChunkedArray) -> Sequence[Any]:
    """One tensor per numeric or fixed-size-list column (indexed per row), Python values otherwise.

    Columns with nulls become per-row lists, with None where the value is missing.
    """
    kind = column.type
    numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    if pa.types.is_fixed_size_list(kind):
        if column.null_count == 0:
            flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            return torch.from_numpy(np.array(flat, dtype=np.float32).reshape(-1, kind.list_size))
        return [None if r is None else torch.tensor(r, dtype=torch.float32) for r in column.to_pylist()]
    if numeric:
        if column.null_count == 0:
            return torch.from_numpy(np.array(column.to_numpy(zero_copy_only=False)))
        dtype = torch.from_numpy(np.zeros(0, kind.to_pandas_dtype())).dtype
        return [None if v is None else torch.tensor(v, dtype=dtype) for v in column.to_pylist()]
    return column.to_pylist()
