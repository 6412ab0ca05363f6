"""`WarmIndex`: an in-memory neighbour index over one embedding column, for interactive `similar`.

    index = WarmIndex.build(store, "fused_emb")         # reads the column once (150k x 1024-d: ~600 MB)
    index.similar("test/dia3_utt1", k=10, where="emotion = 'fear'")   # -> Arrow, like Store.similar

Lance answers a prefiltered `similar` from disk every time (tens of ms at 150k rows); a process that
asks again and again (the explorer, a notebook) keeps the vectors warm here instead. Two paths, picked
by how many rows the filter keeps:

- selective (at most `exact_rows` rows, e.g. fear or disgust, ~3% of MELD): exact cosine over the
  filtered rows;
- broad (e.g. neutral, ~47%): a scan of PCA-reduced vectors (`reduced_dim` wide) picks `candidates`
  rows, re-ranked exactly at full width. Build measures this path's recall@10 against exact search
  on sample queries and widens the reduction until it reaches `target_recall`.

Rows are kept grouped by `group_by` (emotion), so an emotion filter is a contiguous slice (no copy);
other filters are resolved once by Lance (the same SQL as `Store.similar`) and their rows cached.
Searches run BLAS on one thread: a matrix-vector product this size is memory-bound, and waiting for
a second, busy core costs more than it gains.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from threadpoolctl import ThreadpoolController

from featurestore.store import sql_literal

if TYPE_CHECKING:
    from featurestore.store import Store

log = logging.getLogger(__name__)

WARM_AFTER = 3  # `Store.similar` calls on one column before a process keeps its vectors warm
META_COLUMNS = ("key", "split", "speaker", "emotion", "sentiment", "text", "face_visible")
_BLAS = ThreadpoolController()


@dataclass
class _Rows:
    """The rows a filter keeps: a slice of the grouped matrix, or gathered copies."""

    positions: np.ndarray  # positions in the index, ascending
    full: np.ndarray | None  # full-width vectors of those rows (exact path)
    reduced: np.ndarray | None  # reduced vectors of those rows (broad path)


class WarmIndex:
    """Normalised vectors of one column, grouped by a label, with a PCA-reduced copy for broad filters."""

    def __init__(
        self, store: "Store", column: str, version: int, meta: pa.Table, vectors: np.ndarray, *,
        exact_rows: int, reduced_dim: int, candidates: int, target_recall: float, seed: int,
    ):  # fmt: skip
        self.store, self.column, self.version = store, column, version
        self._dataset = store.lance_dataset()  # a handle whose `latest_version` tells of new commits
        self.meta = meta  # scalar columns of the indexed rows, in index order
        self.vectors = vectors  # (rows, dim) unit-norm float32, in index order
        self.exact_rows = exact_rows
        self.candidates = candidates
        self._position = {key: i for i, key in enumerate(meta.column("key").to_pylist())}
        self._cache: OrderedDict[str | None, _Rows] = OrderedDict()
        self._groups: dict[str, slice] = {}
        self.reduced_dim = 0
        self.estimated_recall = 1.0
        if len(vectors) > exact_rows:
            self._fit_reduction(reduced_dim, target_recall, seed)

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, store: "Store", column: str = "fused_emb", *, group_by: str = "emotion", exact_rows: int = 8192,
        reduced_dim: int = 32, candidates: int = 256, target_recall: float = 0.99, seed: int = 0,
    ) -> "WarmIndex":  # fmt: skip
        """Read `column` (rows that have it) and its rows' scalar columns from `store` into memory."""
        start = time.perf_counter()
        dataset = store.lance_dataset()
        version = dataset.version
        present = f"{column} IS NOT NULL"
        meta = dataset.to_table(columns=list(META_COLUMNS), filter=present)
        # Group rows by label first, then stream the vectors straight into their slots: no second copy.
        order = np.argsort(np.asarray(meta.column(group_by).to_pylist(), dtype=object).astype(str), kind="stable")
        slot = np.empty_like(order)
        slot[order] = np.arange(len(order))
        meta = meta.take(pa.array(order))
        dim = dataset.schema.field(column).type.list_size
        vectors = np.empty((len(order), dim), dtype=np.float32)
        filled = 0
        for batch in dataset.to_batches(columns=[column], filter=present):
            flat = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            vectors[slot[filled : filled + len(flat)]] = flat
            filled += len(flat)
        if filled != len(order):
            raise RuntimeError(f"{column}: read {filled} vectors for {len(order)} rows (the store changed mid-read?)")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.where(norms > 0, norms, 1.0)
        index = cls(
            store, column, version, meta, vectors, exact_rows=exact_rows, reduced_dim=reduced_dim,
            candidates=candidates, target_recall=target_recall, seed=seed,
        )  # fmt: skip
        labels = meta.column(group_by).to_pylist()
        for label in dict.fromkeys(labels):
            first = labels.index(label)
            index._groups[f"{group_by} = {sql_literal(label)}"] = slice(first, first + labels.count(label))
        log.info(
            "warm index on %s: %d rows x %d-d, reduced to %d-d (recall@10 %.3f) in %.1f s",
            column, len(vectors), dim, index.reduced_dim, index.estimated_recall, time.perf_counter() - start,
        )  # fmt: skip
        return index

    def _fit_reduction(self, reduced_dim: int, target_recall: float, seed: int) -> None:
        """PCA on a sample; widen it until the broad path's recall@10 on sample queries meets the target."""
        rng = np.random.default_rng(seed)
        rows, dim = self.vectors.shape
        sample = self.vectors[np.sort(rng.choice(rows, min(rows, 8192), replace=False))]
        self._mean = sample.mean(axis=0)
        centred = sample - self._mean
        _, eigenvectors = np.linalg.eigh(centred.T @ centred)
        components = eigenvectors[:, ::-1]  # by variance, largest first
        queries = self.vectors[rng.choice(rows, min(rows, 32), replace=False)]
        exact = [set(_top(scores, 10)[0]) for scores in queries @ self.vectors.T]
        width = min(reduced_dim, dim)
        while True:
            self._projection = np.ascontiguousarray(components[:, :width])
            # x @ P - mean @ P: centring the whole matrix first would copy it (600 MB at 150k x 1024-d)
            self._reduced = self.vectors @ self._projection - self._mean @ self._projection
            everything = _Rows(np.arange(rows), self.vectors, self._reduced)
            found = [set(everything.positions[self._broad(everything, q, 10)[0]]) for q in queries]
            self.reduced_dim = width
            self.estimated_recall = float(np.mean([len(f & e) / 10 for f, e in zip(found, exact)]))
            if self.estimated_recall >= target_recall or width >= dim:
                return
            width = min(dim, width * 2)

    def is_current(self) -> bool:
        """False once the store has a newer version than the one indexed (a pinned handle never does)."""
        return self.store.pinned is not None or self._dataset.latest_version == self.version

    # ---- searching ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.vectors)

    def vector_of(self, key: str) -> np.ndarray:
        if key not in self._position:
            raise KeyError(f"no utterance {key!r} with {self.column} in the index")
        return self.vectors[self._position[key]]

    def similar(
        self, query: str | Sequence[float] | np.ndarray, k: int = 10, *, where: str | None = None,
        columns: Sequence[str] = ("key", "split", "speaker", "emotion", "sentiment", "text"),
    ) -> pa.Table:  # fmt: skip
        """Nearest neighbours by cosine distance (`_distance`), as `Store.similar` answers them."""
        missing = [c for c in columns if c not in self.meta.column_names]
        if missing:
            raise ValueError(f"the warm index holds {', '.join(self.meta.column_names)}, not {', '.join(missing)}")
        exclude = None
        if isinstance(query, str):
            exclude = self._position.get(query)
            if exclude is None:
                raise KeyError(f"no utterance {query!r} with {self.column} in the index")
            vector = self.vectors[exclude]
        else:
            vector = np.asarray(query, dtype=np.float32)
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        positions, distances = self.search(vector, k, where=where, exclude=exclude)
        table = self.meta.select(list(columns)).take(pa.array(positions, pa.int64()))
        return table.append_column("_distance", pa.array(distances, pa.float32()))

    def search(
        self, vector: np.ndarray, k: int = 10, *, where: str | None = None, exclude: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index positions and cosine distances of the `k` nearest rows to a unit `vector`."""
        rows = self._rows(where)
        want = min(k + (exclude is not None), len(rows.positions))
        with _BLAS.limit(limits=1, user_api="blas"):
            if rows.reduced is None:
                local, scores = _top(rows.full @ vector, want)
            else:
                local, scores = self._broad(rows, vector, want)
        positions = rows.positions[local]
        keep = positions != exclude
        return positions[keep][:k], (1.0 - scores[keep][:k]).astype(np.float32)

    def _broad(self, rows: _Rows, vector: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the reduced scan, re-ranked exactly; local indices into `rows`."""
        candidates, _ = _top(rows.reduced @ ((vector - self._mean) @ self._projection), max(self.candidates, want))
        full = self.vectors[rows.positions[candidates]]
        best, scores = _top(full @ vector, want)
        return candidates[best], scores

    def _rows(self, where: str | None) -> _Rows:
        if where in self._cache:
            self._cache.move_to_end(where)
            return self._cache[where]
        span = slice(0, len(self)) if not where else self._groups.get(where.strip())
        if span is not None:
            positions = np.arange(span.start, span.stop)
        else:
            keys = self.store.lance_dataset().to_table(columns=["key"], filter=where).column("key")
            found = pc.index_in(keys, value_set=self.meta.column("key"))
            positions = np.sort(found.drop_null().to_numpy())
            if len(positions) and positions[-1] - positions[0] + 1 == len(positions):
                span = slice(int(positions[0]), int(positions[-1]) + 1)
        if len(positions) <= self.exact_rows:
            rows = _Rows(positions, self.vectors[span] if span else self.vectors[positions], None)
        else:
            rows = _Rows(positions, None, self._reduced[span] if span else self._reduced[positions])
        self._cache[where] = rows
        if len(self._cache) > 16:
            self._cache.popitem(last=False)
        return rows


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the `k` largest scores, largest first."""
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, scores.dtype)
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    best = best[np.argsort(-scores[best], kind="stable")]
    return best, scores[best]


_WARM: OrderedDict[tuple, WarmIndex | int] = OrderedDict()  # (root, pinned, column) -> index, or calls so far
_KEEP_WARM = 3  # indexes kept per process, e.g. the explorer's three columns (each holds its vectors)


def warm_index(store: "Store", column: str = "fused_emb", *, now: bool = False) -> "WarmIndex | None":
    """The process's warm index of `store`'s `column`, built on the `WARM_AFTER`th ask (or `now`);
    None before that. An index whose store has moved on is rebuilt."""
    slot = (store.uri, store.pinned, column)
    found = _WARM.get(slot, 0)
    if isinstance(found, WarmIndex) and found.is_current():
        _WARM.move_to_end(slot)
        return found
    calls = WARM_AFTER if isinstance(found, WarmIndex) else found + 1
    if not now and calls < WARM_AFTER:
        _WARM[slot] = calls
        return None
    _WARM[slot] = index = WarmIndex.build(store, column)
    _WARM.move_to_end(slot)
    while sum(isinstance(v, WarmIndex) for v in _WARM.values()) > _KEEP_WARM:
        oldest = next(s for s, v in _WARM.items() if isinstance(v, WarmIndex))
        del _WARM[oldest]
    return index
