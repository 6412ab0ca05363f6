"""`Store`: the one door to merg's Lance feature store.

    store = Store.open("data/store", create=True, embedding_dim=1024)
    store.write_utterances(rows)                 # exactly once per key, bad rows -> failures
    store.query(emotion="joy", split="train")    # -> pyarrow.Table
    store.similar("test/dia3_utt1", k=10, where="split = 'train'")
    store.stats(); store.versions(); store.tag("run-42"); Store.open(path, version="run-42")

Layout: `<root>/utterances.lance` and `<root>/failures.lance`, each a Lance dataset; every write is
a new version. The store's version is the version of its `utterances` table.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurestore.schema import (
    EMBEDDING_COLUMNS,
    FAILURES,
    FAILURES_SCHEMA,
    META_EMBEDDING_DIM,
    META_FUSED_DIM,
    META_VERSION,
    PRIMARY_KEY,
    RECORD_TABLES,
    SCHEMA_VERSION,
    TARGETS,
    UTTERANCES,
    Rejection,
    conform_records,
    utterances_schema,
    validate_utterances,
)

if TYPE_CHECKING:
    from featurestore.torch_dataset import StoreDataset

log = logging.getLogger(__name__)

SCALAR_INDEX_COLUMNS = ("emotion", "sentiment", "split")
_CONFLICT_RETRIES = 50


class StoreError(RuntimeError):
    pass


class StoreNotFound(StoreError, FileNotFoundError):
    pass


class SchemaVersionMismatch(StoreError):
    pass


class StoreDamaged(StoreError):
    pass


class StoreReadOnly(StoreError):
    pass


@dataclass
class WriteResult:
    inserted: int = 0
    updated: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    version: int | None = None


@dataclass
class StoreStats:
    version: int
    rows: int
    by_split_emotion: dict[str, Counter]
    face_visible: dict[str, Counter]  # split -> "visible" | "not_visible" | "unknown"
    with_embeddings: dict[str, int]  # embedding column -> non-null rows
    failures: Counter  # (stage, reason) -> keys


def sql_literal(value: Any) -> str:
    """A value as a Lance SQL literal (strings quoted, quotes doubled)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return repr(value.item() if isinstance(value, np.generic) else value)
    return "'" + str(value).replace("'", "''") + "'"


def build_filter(where: str | None = None, **equals: Any) -> str | None:
    """AND together `column = value` (or `IN (...)` for lists) and a raw SQL `where`."""
    clauses = []
    for column, value in equals.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, set, frozenset)):
            clauses.append(f"{column} IN ({', '.join(sql_literal(v) for v in sorted(value))})")
        else:
            clauses.append(f"{column} = {sql_literal(value)}")
    if where:
        clauses.append(f"({where})")
    return " AND ".join(clauses) or None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _retry_on_conflict(action, what: str):
    """Run a Lance commit, retrying when another writer committed first."""
    for attempt in range(_CONFLICT_RETRIES):
        try:
            return action()
        except OSError as exc:  # lance raises OSError for commit conflicts
            if "conflict" not in str(exc).lower() and "retryable" not in str(exc).lower():
                raise
            time.sleep(0.05 * (attempt + 1))
    raise StoreError(f"{what}: gave up after {_CONFLICT_RETRIES} commit conflicts")


class Store:
    """A handle on the store at `root`, optionally pinned to a version or tag (then read-only)."""

    def __init__(self, root: Path, embedding_dim: int, fused_dim: int, version: int | str | None = None):
        self.root = Path(root)
        self.embedding_dim = embedding_dim
        self.fused_dim = fused_dim
        self.pinned = version
        self._schema = utterances_schema(embedding_dim, fused_dim)
        self._checked_writable = False

    # ---- opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: Path | str,
        *,
        create: bool = False,
        embedding_dim: int | None = None,
        fused_dim: int | None = None,
        version: int | str | None = None,
    ) -> "Store":
        """Open the store at `root`; with `create`, make it (empty) first if absent."""
        root = Path(root)
        uri = root / f"{UTTERANCES}.lance"
        if not uri.exists() and not create:
            raise StoreNotFound(
                f"no merg store at {root} (expected {uri}); create one with `merg preprocess --store {root}`"
            )
        if create and not _has_commits(uri):  # absent, or its creation stopped before the first commit
            if embedding_dim is None:
                raise ValueError("creating a store needs embedding_dim")
            cls._create(root, embedding_dim, fused_dim or embedding_dim)
        dataset = _open_table(uri, version)  # a pinned version opens even when the latest is damaged
        meta = dataset.schema.metadata or {}
        found = meta.get(META_VERSION, b"<none>").decode()
        if found != str(SCHEMA_VERSION):
            raise SchemaVersionMismatch(
                f"the store at {root} has schema version {found}; this merg reads version {SCHEMA_VERSION}. "
                f"Rebuild it with `merg preprocess --store NEW_DIR` (the old store stays readable by the merg "
                f"that wrote it), or point --store at a store of this version."
            )
        stored_dim, stored_fused = int(meta[META_EMBEDDING_DIM]), int(meta[META_FUSED_DIM])
        if embedding_dim is not None and embedding_dim != stored_dim:
            raise StoreError(f"the store at {root} holds {stored_dim}-d embeddings, not {embedding_dim}-d")
        if fused_dim is not None and fused_dim != stored_fused:
            raise StoreError(f"the store at {root} holds {stored_fused}-d fused embeddings, not {fused_dim}-d")
        store = cls(root, stored_dim, stored_fused, version)
        if version is not None:
            store._utterances()  # fail now on an unknown version or tag
        else:
            store._declare_primary_keys()
        return store

    def _declare_primary_keys(self) -> None:
        """Stores made before the merge keys were declared primary keys get the declaration now:
        without it, two processes upserting the same new key at once would both insert it."""
        for name, (_, fields) in {UTTERANCES: (None, ("key",)), **RECORD_TABLES}.items():
            uri = self.root / f"{name}.lance"
            if not _has_commits(uri):
                continue
            dataset = _open_table(uri)
            missing = [f for f in fields if PRIMARY_KEY.encode() not in (dataset.schema.field(f).metadata or {})]
            if missing:
                try:
                    dataset.update_field_metadata({f: {PRIMARY_KEY: "true"} for f in missing})
                except (OSError, ValueError) as exc:  # e.g. another process declared it at the same moment
                    log.warning("could not declare %s primary key on %s: %s", missing, name, exc)

    @staticmethod
    def _create(root: Path, embedding_dim: int, fused_dim: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for name, schema in ((UTTERANCES, utterances_schema(embedding_dim, fused_dim)), (FAILURES, FAILURES_SCHEMA)):
            uri = root / f"{name}.lance"
            if _has_commits(uri):
                continue
            try:
                lance.write_dataset(schema.empty_table(), str(uri), schema=schema, mode="create")
            except (OSError, ValueError) as exc:  # another process created it first: fine
                if not _has_commits(uri):
                    raise StoreError(f"could not create {uri}: {exc}") from exc

    def at(self, version: int | str) -> "Store":
        """A read-only view of this store at a version number or tag."""
        return Store.open(self.root, version=version)

    def _dataset(self, name: str, version: int | str | None = None) -> lance.LanceDataset:
        return _open_table(self.root / f"{name}.lance", version)

    def _utterances(self) -> lance.LanceDataset:
        return self._dataset(UTTERANCES, self.pinned)

    def _failures(self) -> lance.LanceDataset:
        return self._dataset(FAILURES)

    @property
    def version(self) -> int:
        return self._utterances().version

    def _writable(self) -> None:
        if self.pinned is not None:
            raise StoreError(f"this handle is pinned to version {self.pinned!r} and is read-only")
        if not self._checked_writable:
            check_writable(self.root)
            self._checked_writable = True

    # ---- writes ---------------------------------------------------------------------------------
    def write_utterances(self, rows: pa.Table | Iterable[dict]) -> WriteResult:
        """Upsert rows by key: a re-run neither duplicates nor loses rows. Bad rows -> failures."""
        self._writable()
        table = rows if isinstance(rows, pa.Table) else _loose_table(list(rows))
        valid, rejected = validate_utterances(table, self.embedding_dim, self.fused_dim)
        result = WriteResult(rejected=rejected)
        if valid.num_rows:

            def upsert() -> dict:
                return (
                    self._utterances()
                    .merge_insert("key")
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .conflict_retries(_CONFLICT_RETRIES)
                    .execute(valid)
                )

            stats = _retry_on_conflict(upsert, "write_utterances")
            result.inserted, result.updated = stats["num_inserted_rows"], stats["num_updated_rows"]
        if rejected:
            self.record_failures([(r.key, "store", r.reason, r.detail) for r in rejected])
            for r in rejected[:5]:
                log.warning("rejected %s: %s (%s)", r.key, r.reason, r.detail)
        result.version = self.version
        return result

    def record_failures(self, failures: Sequence[tuple[str, str, str, str]]) -> None:
        """Record (key, stage, reason, detail); a failure seen again has its `attempts` counted up."""
        self._writable()
        if not failures:
            return
        latest = {(k, s): (r, d) for k, s, r, d in failures}
        keys = sorted({k for k, _ in latest})
        previous = self._failures().to_table(
            columns=["key", "stage", "attempts"], filter=build_filter(key=keys)
        ).to_pylist()
        attempts = {(p["key"], p["stage"]): p["attempts"] for p in previous}
        now = _now()
        table = pa.Table.from_pylist(
            [
                dict(key=k, stage=s, reason=r, detail=d, attempts=attempts.get((k, s), 0) + 1, last_seen=now)
                for (k, s), (r, d) in sorted(latest.items())
            ],
            schema=FAILURES_SCHEMA,
        )
        self._upsert(FAILURES, table)

    def write_records(self, name: str, rows: pa.Table | list[dict]) -> int:
        """Upsert rows into a record table (`targets`, evaluation tables) on its key; returns rows written.

        The table is created on first write; like `utterances`, every write is a new Lance version.
        """
        self._writable()
        table = conform_records(name, rows)
        if table.num_rows:
            uri = self.root / f"{name}.lance"
            if not _has_commits(uri):
                try:
                    lance.write_dataset(table.schema.empty_table(), str(uri), mode="create")
                except (OSError, ValueError):
                    if not _has_commits(uri):  # not another process creating it first: e.g. the disk is full
                        raise
            self._add_new_columns(name, table.schema)
            self._upsert(name, table)
        return table.num_rows

    def _add_new_columns(self, name: str, schema: pa.Schema) -> None:
        """A table written before its schema gained (nullable) columns gets them, as nulls (metadata only)."""
        missing = [f for f in schema if f.name not in self._dataset(name).schema.names]
        if missing:
            try:
                self._dataset(name).add_columns(missing)
            except (OSError, ValueError) as exc:  # e.g. another process added them at the same moment
                if any(f.name not in self._dataset(name).schema.names for f in missing):
                    raise StoreError(f"could not add columns {[f.name for f in missing]} to {name}: {exc}") from exc

    def _upsert(self, name: str, table: pa.Table) -> None:
        on = list(RECORD_TABLES[name][1])
        _retry_on_conflict(
            lambda: self._dataset(name)
            .merge_insert(on)
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .conflict_retries(_CONFLICT_RETRIES)
            .execute(table),
            f"write {name}",
        )

    def read_records(
        self, name: str, where: str | None = None, columns: Sequence[str] | None = None, version: int | str | None = None
    ) -> pa.Table:
        """Rows of a record table (at `version`, a number or tag, else the latest); an absent table reads as empty."""
        if not _has_commits(self.root / f"{name}.lance"):
            schema = RECORD_TABLES[name][0]
            return schema.empty_table().select(list(columns)) if columns else schema.empty_table()
        return self._dataset(name, version).to_table(filter=where, columns=list(columns) if columns else None)

    def targets(
        self, kind: str, *, split: str | Sequence[str] | None = None, where: str | None = None,
        columns: Sequence[str] | None = None, version: int | str | None = None,
    ) -> pa.Table:  # fmt: skip
        """Training/evaluation examples of one kind (`next_utterance` or `teacher`), sorted by key; `version`
        (number or tag) reads the targets table as it was then."""
        table = self.read_records(TARGETS, build_filter(where, kind=kind, split=split), columns, version)
        return table.sort_by("key") if "key" in table.column_names else table

    def clear_failures(self, keys: Sequence[str], stage: str | None = None) -> None:
        """Forget failures of `keys` (e.g. once a re-run processed them)."""
        self._writable()
        if keys:
            condition = build_filter(key=list(keys), stage=stage)
            _retry_on_conflict(lambda: self._failures().delete(condition), "clear_failures")

    # ---- reads ----------------------------------------------------------------------------------
    def query(
        self,
        *,
        emotion: str | Sequence[str] | None = None,
        sentiment: str | Sequence[str] | None = None,
        split: str | Sequence[str] | None = None,
        speaker: str | Sequence[str] | None = None,
        face_visible: bool | None = None,
        where: str | None = None,
        columns: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Rows matching every given condition, as Arrow (`.to_pandas()` for pandas)."""
        condition = build_filter(
            where, emotion=emotion, sentiment=sentiment, split=split, speaker=speaker, face_visible=face_visible
        )
        return self._utterances().to_table(
            columns=list(columns) if columns else None, filter=condition, limit=limit
        )

    def torch_dataset(
        self, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, **query: Any
    ) -> "StoreDataset":
        """A torch IterableDataset over `query(**query)` rows, shuffled and sharded by rank."""
        from featurestore.torch_dataset import StoreDataset

        columns = query.get("columns")
        if columns and "key" not in columns:
            query["columns"] = ["key", *columns]
        return StoreDataset(self.query(**query), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)

    def keys(self, where: str | None = None) -> set[str]:
        """Keys present (e.g. to skip finished work in a re-run)."""
        return set(self._utterances().to_table(columns=["key"], filter=where).column("key").to_pylist())

    def failures(self, where: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        return self._failures().to_table(filter=where, columns=list(columns) if columns else None)

    def vector_of(self, key: str, column: str = "fused_emb") -> np.ndarray:
        table = self._utterances().to_table(columns=[column], filter=build_filter(key=key))
        if table.num_rows == 0:
            raise KeyError(f"no utterance {key!r} in the store")
        vector = table.column(column)[0].as_py()
        if vector is None:
            raise ValueError(f"{key} has no {column} (its clip was missing or failed)")
        return np.asarray(vector, dtype=np.float32)

    def vectors(self, column: str = "fused_emb", **query: Any) -> dict[str, np.ndarray]:
        """Key -> vector for the rows of `query(**query)` that have `column` (e.g. a split's embeddings)."""
        table = self.query(columns=["key", column], **query)
        table = table.filter(table.column(column).is_valid())
        width = table.schema.field(column).type.list_size
        flat = table.column(column).combine_chunks().flatten().to_numpy() if table.num_rows else np.zeros(0, np.float32)
        return dict(zip(table.column("key").to_pylist(), flat.reshape(-1, width)))

    def similar(
        self,
        query: str | Sequence[float] | np.ndarray,
        k: int = 10,
        *,
        column: str = "fused_emb",
        where: str | None = None,
        columns: Sequence[str] = ("key", "split", "speaker", "emotion", "sentiment", "text"),
        use_index: bool | None = None,
        nprobes: int = 64,
        refine_factor: int = 20,
        warm: bool | None = None,
    ) -> pa.Table:
        """Nearest neighbours by cosine distance (`_distance`), prefiltered by `where`.

        `query` is a key (that row is left out of the answer) or a vector. Exact search unless the
        column has a vector index (`use_index=None` uses it when present); the index is queried with
        `nprobes` partitions and its candidates re-ranked exactly (`refine_factor`). A prefilter
        scatters the wanted rows over many partitions, so recall follows `nprobes`: the default
        probes every partition of an index built here up to ~260k rows (`benchmarks/store.py`
        measures recall and latency; lower `nprobes` trades the one for the other).

        `warm=True` answers from an in-memory `featurestore.index.WarmIndex` (built on first use);
        by default a process that asks about a column repeatedly (and leaves `use_index` unset)
        gets one from its third call on; `warm=False` always asks Lance.
        """
        if column not in EMBEDDING_COLUMNS:
            raise ValueError(f"{column!r} is not an embedding column ({', '.join(EMBEDDING_COLUMNS)})")
        if warm or (warm is None and use_index is None):
            from featurestore.index import warm_index

            index = warm_index(self, column, now=bool(warm))
            if index is not None and set(columns) <= set(index.meta.column_names):
                try:
                    return index.similar(query, k, where=where, columns=columns)
                except KeyError:
                    pass  # a key without this vector: Lance's path says why
        exclude = None
        if isinstance(query, str):
            exclude, query = query, self.vector_of(query, column)
        vector = np.asarray(query, dtype=np.float32)
        dataset = self._utterances()
        if use_index is None:
            use_index = self.has_vector_index(column)
        # Lance skips null vectors itself; a `column IS NOT NULL` filter would read every vector.
        # The query key is dropped from k + 1 answers rather than filtered (a filter forces a prefilter).
        nearest: dict[str, Any] = dict(column=column, q=vector, k=k + bool(exclude), metric="cosine", use_index=use_index)
        if use_index:
            nearest.update(nprobes=nprobes)
            if refine_factor:
                nearest["refine_factor"] = refine_factor
        table = dataset.to_table(
            columns=[*columns, "_distance"], filter=where or None, prefilter=bool(where), nearest=nearest
        )
        if exclude:
            table = table.filter(pc.not_equal(table.column("key"), exclude)).slice(0, k)
        return table

    def has_vector_index(self, column: str = "fused_emb") -> bool:
        return any(
            column in index.field_names and "IVF" in index.index_type.upper()
            for index in self._utterances().describe_indices()
        )

    def stats(self) -> StoreStats:
        dataset = self._utterances()
        table = dataset.to_table(columns=["split", "emotion", "face_visible"])
        by_split_emotion: dict[str, Counter] = {}
        face_visible: dict[str, Counter] = {}
        for split, emotion, visible in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            by_split_emotion.setdefault(split, Counter())[emotion] += 1
            state = "unknown" if visible is None else ("visible" if visible else "not_visible")
            face_visible.setdefault(split, Counter())[state] += 1
        with_embeddings = {
            c: dataset.count_rows(filter=f"{c} IS NOT NULL") for c in EMBEDDING_COLUMNS
        }
        failures = self._failures().to_table(columns=["stage", "reason"])
        return StoreStats(
            version=dataset.version,
            rows=table.num_rows,
            by_split_emotion=by_split_emotion,
            face_visible=face_visible,
            with_embeddings=with_embeddings,
            failures=Counter(zip(failures.column("stage").to_pylist(), failures.column("reason").to_pylist())),
        )

    # ---- versions, tags, indexes ----------------------------------------------------------------
    def versions(self) -> list[dict]:
        """Every version of the utterances table: number, timestamp, rows, tags."""
        dataset = self._dataset(UTTERANCES)
        tags_by_version: dict[int, list[str]] = {}
        for name, info in self.tags().items():
            tags_by_version.setdefault(info, []).append(name)
        return [
            dict(
                version=v["version"],
                timestamp=v["timestamp"],
                rows=self._dataset(UTTERANCES, v["version"]).count_rows(),
                tags=sorted(tags_by_version.get(v["version"], [])),
            )
            for v in dataset.versions()
        ]

    def tags(self) -> dict[str, int]:
        return {name: info["version"] for name, info in self._dataset(UTTERANCES).tags.list().items()}

    def tag(self, name: str, version: int | None = None) -> int:
        """Tag a version (default: the current one), e.g. the version a training run read."""
        self._writable()
        dataset = self._dataset(UTTERANCES)
        version = version or dataset.version
        if name in self.tags():
            dataset.tags.update(name, version)
        else:
            dataset.tags.create(name, version)
        return version

    def create_indexes(
        self, *, scalar: bool = True, vectors: bool = False, column: str = "fused_emb",
        num_partitions: int | None = None, num_sub_vectors: int | None = None,
    ) -> list[str]:  # fmt: skip
        """BITMAP indexes on emotion/sentiment/split; with `vectors`, an IVF_PQ index (cosine)."""
        self._writable()
        dataset = self._dataset(UTTERANCES)
        built = []
        if scalar:
            for name in SCALAR_INDEX_COLUMNS:
                dataset.create_scalar_index(name, index_type="BITMAP", replace=True)
                built.append(f"{name}: BITMAP")
        if vectors:
            rows = dataset.count_rows(filter=f"{column} IS NOT NULL")
            if rows < 256:
                raise StoreError(f"an IVF_PQ index needs at least 256 rows with {column}; the store has {rows}")
            dim = dataset.schema.field(column).type.list_size
            # ~4k vectors per partition: few enough partitions that a prefiltered query finds its
            # neighbours within `nprobes` of them.
            num_partitions = num_partitions or max(1, rows // 4096)
            num_sub_vectors = num_sub_vectors or next(s for s in (dim // 16, dim // 8, dim // 4, dim // 2, 1) if s and dim % s == 0)
            dataset.create_index(
                column, index_type="IVF_PQ", metric="cosine", num_partitions=num_partitions,
                num_sub_vectors=num_sub_vectors, replace=True,
            )  # fmt: skip
            built.append(f"{column}: IVF_PQ cosine, {num_partitions} partitions, {num_sub_vectors} sub-vectors")
        return built

    def lance_dataset(self, table: str = UTTERANCES) -> lance.LanceDataset:
        """The underlying Lance dataset, for other readers (DuckDB, Polars, LanceDB, lance.torch)."""
        return self._utterances() if table == UTTERANCES else self._dataset(table)


def _loose_table(rows: list[dict]) -> pa.Table:
    """Rows as Arrow without forcing embedding widths, so a wrong width is a rejection, not a crash."""
    table = pa.Table.from_pylist(rows)
    for column in EMBEDDING_COLUMNS:
        if column in table.column_names and pa.types.is_null(table.column(column).type):
            table = table.set_column(
                table.column_names.index(column), column, pa.nulls(table.num_rows, pa.list_(pa.float32()))
            )
    return table


# ---- machine faults: a damaged table, a store that cannot be written ------------------------------
_LANCE_SOURCE = re.compile(r",\s*/\S+\.rs:\d+:\d+")  # lance appends its Rust source locations
_TABLE_IN_MESSAGE = re.compile(r"(/?[^\s'\"]*?([A-Za-z_]\w*)\.lance)/(?:data|_versions|_deletions|_indices|_transactions)\b")


def _open_table(uri: Path, version: int | str | None = None) -> lance.LanceDataset:
    """A Lance table; an unknown version is a StoreError, anything else that stops it opening StoreDamaged."""
    try:
        return lance.dataset(str(uri), version=version)
    except (ValueError, OSError) as exc:
        if version is not None and _opens(uri):
            raise StoreError(f"{uri.parent}: no version or tag {version!r} of {uri.stem}") from exc
        raise damaged_table(uri, exc) from exc


_LANCE_PARTS = {"data", "_versions", "_transactions", "_deletions", "_indices"}


def _has_commits(uri: Path) -> bool:
    """False for an absent record table and for one whose creation stopped before its first commit (a full
    disk, a kill): Lance's own folders and no manifest hold nothing committed, and creating over them is
    safe. A folder with anything else in it is left to `_open_table` to call damaged."""
    if not uri.exists():
        return False
    if versions_on_disk(uri):
        return True
    return not all(part.name in _LANCE_PARTS for part in uri.iterdir())


def _opens(uri: Path) -> bool:
    try:
        lance.dataset(str(uri))
        return True
    except (ValueError, OSError):
        return False


def versions_on_disk(uri: Path) -> list[int]:
    """Version numbers whose manifests are on disk (Lance names them either `N` or `2**64 - 1 - N`)."""
    numbers = []
    for manifest in (Path(uri) / "_versions").glob("*.manifest"):
        if manifest.stem.isdigit():
            n = int(manifest.stem)
            numbers.append(2**64 - 1 - n if n > 2**63 else n)
    return sorted(numbers)


def damaged_table(uri: Path, exc: BaseException) -> StoreDamaged:
    """One line: which table is damaged, Lance's reason, and the versions that may still open."""
    uri = Path(uri)
    why = _LANCE_SOURCE.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    versions = versions_on_disk(uri)
    hint = (
        f"earlier versions may still open with --version N (on disk: {', '.join(map(str, versions[-6:]))})"
        if versions else "no version manifests on disk: restore the table from a copy or rebuild it"
    )
    return StoreDamaged(f"the store's {uri.stem!r} table is damaged ({uri}: {why[:300]}); {hint}")


def explain_store_error(exc: BaseException) -> str | None:
    """The one-line damage report for an error that names a file inside a Lance table, else None."""
    if isinstance(exc, StoreDamaged):
        return str(exc)
    match = _TABLE_IN_MESSAGE.search(str(exc))
    if match is None or not isinstance(exc, (ValueError, OSError)):
        return None
    uri = Path(match.group(1))
    if not uri.is_absolute() and (Path("/") / uri).exists():  # lance drops the leading slash
        uri = Path("/") / uri
    return str(damaged_table(uri, exc))


def check_writable(root: Path | str) -> None:
    """Refuse at once when the store's folder cannot be written (read-only mount, no permission)."""
    root = Path(root)
    existing = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".merg-write-check-"):
            pass
    except OSError as exc:
        raise StoreReadOnly(
            f"the store at {root} cannot be written ({existing}: {exc.strerror or exc}); write commands refuse, "
            "read commands (merg store stats/query/export, --version) still work"
        ) from exc
