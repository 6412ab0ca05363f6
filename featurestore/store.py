"""`Store`: the one door to merg's Lance feature store.

    store = Store.open("data/store", create=True, embedding_dim=1024)
    store.write_utterances(rows)                 # exactly once per key, bad rows -> failures
    store.query(emotion="joy", split="train")    # -> pyarrow.Table
    store.similar("test/dia3_utt1", k=10, where="split = 'train'")
    store.stats(); store.versions(); store.tag("run-42"); Store.open(path, version="run-42")

Layout: `<root>/utterances.lance` and `<root>/failures.lance`, each a Lance dataset; every write is
a new version. The store's version is the version of its `utterances` table. `root` is a local folder
or an object-storage URI (`s3://bucket/store`, see `featurestore.storage`).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import lance
import lance.fragment
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurestore import storage
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

SCALAR_INDEX_COLUMNS = ("emotion", "sentiment", "split")  # BITMAP: few distinct values
KEY_INDEX = "key"  # BTREE: key lookups, and the commit's search for rows a key replaces
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


class BadFilter(StoreError, ValueError):
    """A `where` filter Lance cannot parse or resolve against the table."""


@dataclass
class WriteResult:
    inserted: int = 0
    updated: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    version: int | None = None


@dataclass
class WrittenFragments:
    """What a worker wrote with `write_fragments`: Lance data files not yet part of any version, the keys
    they hold, and the rows refused (for the failures table). Small: it travels to the committing process."""

    fragments: list  # lance.FragmentMetadata
    keys: list[str]
    rejected: list[Rejection] = field(default_factory=list)


@dataclass
class UpkeepReport:
    fragments_before: int
    fragments_after: int
    versions_before: int
    versions_after: int
    duplicates_removed: int
    indices: list[str]
    seconds: float


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

    def __init__(self, root: storage.Location, embedding_dim: int, fused_dim: int, version: int | str | None = None):
        self.root = storage.location(root)
        self.embedding_dim = embedding_dim
        self.fused_dim = fused_dim
        self.pinned = version
        self._schema = utterances_schema(embedding_dim, fused_dim)
        self._checked_writable = False

    # ---- opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: storage.Location,
        *,
        create: bool = False,
        embedding_dim: int | None = None,
        fused_dim: int | None = None,
        version: int | str | None = None,
    ) -> "Store":
        """Open the store at `root`; with `create`, make it (empty) first if absent."""
        root = storage.location(root)
        storage.check_access(root)  # object storage: a wrong key, bucket or endpoint fails here, in one line
        if isinstance(root, Path) and root.exists() and not root.is_dir():
            raise StoreNotFound(f"{root} is a file, not a merg store folder: point --store at a folder")
        uri = storage.join(root, f"{UTTERANCES}.lance")
        if not storage.exists(uri) and not create:
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
            uri = self._table_uri(name)
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
    def _create(root: storage.Location, embedding_dim: int, fused_dim: int) -> None:
        if not storage.is_uri(root):
            root.mkdir(parents=True, exist_ok=True)
        for name, schema in ((UTTERANCES, utterances_schema(embedding_dim, fused_dim)), (FAILURES, FAILURES_SCHEMA)):
            uri = storage.join(root, f"{name}.lance")
            if _has_commits(uri):
                continue
            try:
                lance.write_dataset(schema.empty_table(), str(uri), schema=schema, mode="create",
                                    storage_options=storage.lance_options(uri))  # fmt: skip
            except (OSError, ValueError) as exc:  # another process created it first: fine
                if not _has_commits(uri):
                    raise StoreError(f"could not create {uri}: {exc}") from exc

    def at(self, version: int | str) -> "Store":
        """A read-only view of this store at a version number or tag."""
        return Store.open(self.root, version=version)

    def _table_uri(self, name: str) -> storage.Location:
        return storage.join(self.root, f"{name}.lance")

    @property
    def uri(self) -> str:
        """The store's URI, or its absolute local path."""
        return storage.as_string(self.root)

    def has_table(self, name: str) -> bool:
        """Has the table (`targets`, an evaluation table, ...) been written to?"""
        return _has_commits(self._table_uri(name))

    def _dataset(self, name: str, version: int | str | None = None) -> lance.LanceDataset:
        return _open_table(self._table_uri(name), version)

    def _utterances(self) -> lance.LanceDataset:
        return self._dataset(UTTERANCES, self.pinned)

    def _failures(self) -> lance.LanceDataset:
        return self._dataset(FAILURES)

    @contextmanager
    def _reading(self, name: str, where: str | None = None):
        """Lance's errors while reading table `name`, in one line: a `where` it cannot use names that
        filter; an I/O error (a truncated or vanished data file) is damage naming the table."""
        try:
            yield
        except StoreError:
            raise
        except (ValueError, OSError) as exc:
            text = str(exc)
            if where and text.startswith("Invalid user input"):
                why = _LANCE_SOURCE.sub("", text.splitlines()[0]).removeprefix("Invalid user input: ")
                raise BadFilter(f"the filter {where!r} does not work on the store's {name!r} table: {why[:300]}") from exc
            if _DATA_DAMAGE.search(text) and not _DISK_FAULT.search(text):
                raise damaged_table(storage.join(self.root, f"{name}.lance"), exc) from exc
            raise

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
            uri = self._table_uri(name)
            if not _has_commits(uri):
                try:
                    lance.write_dataset(table.schema.empty_table(), str(uri), mode="create", storage_options=storage.lance_options(uri))
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
        if not self.has_table(name):
            schema = RECORD_TABLES[name][0]
            return schema.empty_table().select(list(columns)) if columns else schema.empty_table()
        with self._reading(name, where):
            return self._dataset(name, version).to_table(filter=where, columns=list(columns) if columns else None)

    def targets(
        self, kind: str, *, split: str | Sequence[str] | None = None, where: str | None = None,
        columns: Sequence[str] | None = None, version: int | str | None = None,
    ) -> pa.Table:  # fmt: skip
        """Training/evaluation examples of one kind (`next_utterance` or `teacher`), sorted by key; `version`
        (number or tag) reads the targets table as it was then."""
        table = self.read_records(TARGETS, build_filter(where, kind=kind, split=split), columns, version)
        return table.sort_by("key") if "key" in table.column_names else table

    def clear_failures(
        self, keys: Sequence[str], stage: str | Sequence[str] | None = None, keep: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Forget failures of `keys` (e.g. once a re-run processed them), of `stage` (one or several) if
        given, except the (key, stage) records in `keep`: the failures this attempt saw again, so that a
        key that still fails keeps its reason."""
        self._writable()
        kept: dict[str, list[str]] = {}
        for key, kept_stage in keep:
            kept.setdefault(key, []).append(kept_stage)
        if keys:
            condition = build_filter(key=list(keys), stage=stage)
            if kept:
                spared = " OR ".join(f"({build_filter(key=k, stage=s)})" for k, s in sorted(kept.items()))
                condition = f"{condition} AND NOT ({spared})"
            _retry_on_conflict(lambda: self._failures().delete(condition), "clear_failures")

    # ---- fragments written by workers, committed here -------------------------------------------
    def commit_fragments(
        self, written: Sequence[WrittenFragments], replace: Iterable[str] | None = None, as_of: int | None = None
    ) -> int:
        """Make fragments that workers wrote (`write_fragments`) part of the store, in one commit: a Lance
        Update that adds them and deletes every stored row of their keys, so a recomputed key replaces its
        row and a key is never stored twice. Returns the new version. `replace` and `as_of`: a caller
        that knows which of the keys were stored at version `as_of` (most are new in a first run) saves
        the search for the others; once the store has moved past `as_of`, every key is searched.

        A commit conflicts when another writer changed the same fragments since it read them; it is then
        planned again against the newer version. Rows of these keys that another writer committed between
        the read and the commit survive Lance's rebase (its conflict check sees fragments, not keys): those
        are found after the commit and the older row of each key is deleted."""
        self._writable()
        fragments = [f for w in written for f in w.fragments]
        keys = [k for w in written for k in w.keys]
        if len(set(keys)) != len(keys):
            raise ValueError("commit_fragments: a key is in two of the fragments; commit them separately")
        if not fragments:
            return self.version

        known = None if replace is None else sorted(set(replace) & set(keys))

        def commit() -> tuple[int, int]:
            dataset = self._dataset(UTTERANCES)
            lookup = keys if known is None or dataset.version != as_of else known
            removed, updated = _delete_rows(dataset, _row_addresses(dataset, lookup))
            operation = lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated, new_fragments=fragments)
            done = lance.LanceDataset.commit(dataset, operation, read_version=dataset.version, max_retries=_CONFLICT_RETRIES)
            return dataset.version, done.version

        read, version = _retry_on_conflict(commit, "commit fragments")
        if version != read + 1:  # another writer committed in between: it may have stored some of these keys
            self.drop_duplicate_keys(keys)
        return version

    def drop_duplicate_keys(self, keys: Sequence[str] | None = None) -> int:
        """Leave one row per key (of `keys`, or every key): the newest by `created_at`, then by commit order.
        Returns the rows deleted. Duplicates arise only from writers racing on the same key (see
        `commit_fragments`) or from a process killed between such a commit and this clean-up."""
        self._writable()

        def drop() -> int:
            dataset = self._dataset(UTTERANCES)
            table = dataset.to_table(
                columns=["key", "created_at"], filter=build_filter(key=list(keys)) if keys else None, with_row_address=True
            )
            if table.num_rows == pc.count_distinct(table.column("key")).as_py():
                return 0
            table = table.sort_by([("key", "ascending"), ("created_at", "descending"), ("_rowaddr", "descending")])
            key = table.column("key").to_numpy(zero_copy_only=False)
            older = np.concatenate([[False], key[1:] == key[:-1]])  # all but the first (newest) row of a key
            addresses = table.column("_rowaddr").to_numpy()[older]
            removed, updated = _delete_rows(dataset, addresses)
            operation = lance.LanceOperation.Delete(updated_fragments=updated, deleted_fragment_ids=removed, predicate="duplicate keys")
            lance.LanceDataset.commit(dataset, operation, read_version=dataset.version, max_retries=_CONFLICT_RETRIES)
            log.warning("removed %d older duplicate row(s) of %d key(s)", len(addresses), len(set(key[older])))
            return len(addresses)

        return _retry_on_conflict(drop, "drop duplicate keys")

    def compact_small_fragments(self, rows: int = 1024, rewrite=None) -> int:
        """Merge the small fragments writers left (fewer than `rows` rows each) into fragments of about
        `rows` rows, during a job, so that reads stay fast while it runs. The rewrite is Lance's
        distributed compaction: planned here, each task executed by `rewrite(tasks, store_uri)` (default:
        in this process; the preprocessing job hands them to Ray tasks, so no row passes through its
        driver), committed here. Returns the fragments removed; 0 when another writer got in first."""
        self._writable()
        from lance.optimize import Compaction

        dataset = self._dataset(UTTERANCES)
        plan = Compaction.plan(dataset, {"target_rows_per_fragment": rows, "materialize_deletions": False})
        if not plan.tasks:
            return 0
        results = rewrite(plan.tasks, self.root) if rewrite else [task.execute(dataset) for task in plan.tasks]
        try:
            return Compaction.commit(self._dataset(UTTERANCES), results).fragments_removed
        except (OSError, ValueError) as exc:  # a commit of the same fragments won: the next round retries
            log.info("compaction skipped: %s", str(exc).splitlines()[0][:200])
            return 0

    # ---- upkeep ----------------------------------------------------------------------------------
    def optimize(self, retention: timedelta = timedelta(days=7)) -> UpkeepReport:
        """Keep the store fast as it grows: one row per key, small fragments compacted (deleted rows
        dropped), the scalar indexes built when missing and every index brought up to date, and versions
        older than `retention` removed (tagged versions are always kept). Safe while other processes
        read or write: a compaction that conflicts with a commit is planned again."""
        self._writable()
        started = time.perf_counter()
        before = self._dataset(UTTERANCES)
        fragments_before, versions_before = len(before.get_fragments()), len(before.versions())
        duplicates = self.drop_duplicate_keys()
        names = [UTTERANCES, *(n for n in RECORD_TABLES if self.has_table(n))]
        self._refresh_indices()  # first: Lance compacts fragments an index covers apart from those it does not
        for name in names:
            _retry_on_conflict(lambda name=name: self._dataset(name).optimize.compact_files(materialize_deletions=True),
                               f"compact {name}")  # fmt: skip
        indices = self._refresh_indices()
        for name in names:
            self._dataset(name).cleanup_old_versions(older_than=retention, error_if_tagged_old_versions=False)
        after = self._dataset(UTTERANCES)
        return UpkeepReport(
            fragments_before, len(after.get_fragments()), versions_before, len(after.versions()), duplicates,
            indices, time.perf_counter() - started,
        )  # fmt: skip

    def _refresh_indices(self) -> list[str]:
        """The scalar indexes (built when missing), then every index of `utterances` extended to the rows
        committed since it was built."""
        dataset = self._dataset(UTTERANCES)
        have = {name for index in dataset.describe_indices() for name in index.field_names}
        if not have >= {*SCALAR_INDEX_COLUMNS, KEY_INDEX}:
            self.create_indexes(scalar=True, only_missing=True)
        _retry_on_conflict(lambda: self._dataset(UTTERANCES).optimize.optimize_indices(), "optimize indices")
        return [f"{', '.join(i.field_names)}: {i.type_url.rsplit('.', 1)[-1].removesuffix('IndexDetails')}, {i.num_rows_indexed} rows"
                for i in self._dataset(UTTERANCES).describe_indices()]  # fmt: skip

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
        with self._reading(UTTERANCES, where):
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
        with self._reading(UTTERANCES, where):
            return set(self._utterances().to_table(columns=["key"], filter=where).column("key").to_pylist())

    def failures(self, where: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        with self._reading(FAILURES, where):
            return self._failures().to_table(filter=where, columns=list(columns) if columns else None)

    def vector_of(self, key: str, column: str = "fused_emb") -> np.ndarray:
        with self._reading(UTTERANCES):
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
        with self._reading(UTTERANCES, where):
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
        with self._reading(UTTERANCES):
            return self._stats()

    def _stats(self) -> StoreStats:
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
        with self._reading(FAILURES):
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
        with self._reading(UTTERANCES):
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
        num_partitions: int | None = None, num_sub_vectors: int | None = None, only_missing: bool = False,
    ) -> list[str]:  # fmt: skip
        """BITMAP indexes on emotion/sentiment/split and a BTREE on key; with `vectors`, an IVF_PQ index
        (cosine). `only_missing`: leave scalar indexes that exist as they are."""
        self._writable()
        dataset = self._dataset(UTTERANCES)
        built = []
        if scalar:
            have = {name for index in dataset.describe_indices() for name in index.field_names} if only_missing else set()
            for name, kind in [*((n, "BITMAP") for n in SCALAR_INDEX_COLUMNS), (KEY_INDEX, "BTREE")]:
                if name not in have:
                    dataset.create_scalar_index(name, index_type=kind, replace=True)
                    built.append(f"{name}: {kind}")
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


def write_fragments(root: storage.Location, rows: pa.Table | Iterable[dict], embedding_dim: int, fused_dim: int) -> WrittenFragments:
    """Worker side of a distributed write: validate rows and write them as new data files of the store's
    `utterances` table, in this process (local disk or object storage). Nothing is visible until one
    process commits the returned metadata with `Store.commit_fragments`; files of a worker that dies
    before that are never part of a version (upkeep deletes them after Lance's 7-day grace period)."""
    table = rows if isinstance(rows, pa.Table) else _loose_table(list(rows))
    valid, rejected = validate_utterances(table, embedding_dim, fused_dim)
    fragments = []
    if valid.num_rows:
        uri = storage.join(storage.location(root), f"{UTTERANCES}.lance")
        fragments = lance.fragment.write_fragments(valid, str(uri), schema=valid.schema, storage_options=storage.lance_options(uri))
    return WrittenFragments(fragments, valid.column("key").to_pylist(), rejected)


def _row_addresses(dataset: lance.LanceDataset, keys: Sequence[str]) -> np.ndarray:
    """Row addresses (fragment id << 32 | offset) of the stored rows of `keys`."""
    if not keys:
        return np.zeros(0, np.uint64)
    found = dataset.to_table(columns=["key"], filter=build_filter(key=list(keys)), with_row_address=True)
    return found.column("_rowaddr").to_numpy()


def _delete_rows(dataset: lance.LanceDataset, addresses: np.ndarray) -> tuple[list[int], list]:
    """Deletion files for rows by address, not yet committed: (ids of fragments left empty, updated fragments)."""
    addresses = np.asarray(addresses, np.uint64)
    removed, updated = [], []
    for fragment_id in np.unique(addresses >> np.uint64(32)):
        offsets = (addresses[addresses >> np.uint64(32) == fragment_id] & np.uint64(0xFFFFFFFF)).tolist()
        after = dataset.get_fragment(int(fragment_id)).delete_rows(offsets)
        (updated.append(after) if after is not None else removed.append(int(fragment_id)))
    return removed, updated


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
# a data file that cannot be read back: truncated ("failed to fill whole buffer"), gone, corrupt
_DATA_DAMAGE = re.compile(r"LanceError\((IO|Corrupt\w*)\)|failed to fill whole buffer|Not found: ")
_DISK_FAULT = re.compile(r"No space left|os error 28|Read-only file system|os error 30|Permission denied")
_TABLE_IN_MESSAGE = re.compile(r"(/?[^\s'\"]*?([A-Za-z_]\w*)\.lance)/(?:data|_versions|_deletions|_indices|_transactions)\b")


def _open_table(uri: storage.Location, version: int | str | None = None) -> lance.LanceDataset:
    """A Lance table; an unknown version is a StoreError, object storage that refuses a StorageError,
    anything else that stops it opening StoreDamaged."""
    try:
        return lance.dataset(str(uri), version=version, storage_options=storage.lance_options(uri))
    except (ValueError, OSError) as exc:
        if storage.is_uri(uri) and storage.explain(uri, exc):
            raise storage.storage_error(uri, exc) from exc
        if version is not None and _opens(uri):
            raise StoreError(f"{storage.parent(uri)}: no version or tag {version!r} of {_table_name(uri)}") from exc
        raise damaged_table(uri, exc) from exc


def _table_name(uri: storage.Location) -> str:
    return storage.name(uri).removesuffix(".lance")


_LANCE_PARTS = {"data", "_versions", "_transactions", "_deletions", "_indices"}


def _has_commits(uri: storage.Location) -> bool:
    """False for an absent record table and for one whose creation stopped before its first commit (a full
    disk, a kill): Lance's own folders and no manifest hold nothing committed, and creating over them is
    safe. A folder with anything else in it is left to `_open_table` to call damaged."""
    parts = storage.list_dir(uri)
    if not parts:
        return False
    if versions_on_disk(uri):
        return True
    return not all(part in _LANCE_PARTS for part in parts)


def _opens(uri: storage.Location) -> bool:
    try:
        lance.dataset(str(uri), storage_options=storage.lance_options(uri))
        return True
    except (ValueError, OSError):
        return False


def versions_on_disk(uri: storage.Location) -> list[int]:
    """Version numbers whose manifests are on disk (Lance names them either `N` or `2**64 - 1 - N`)."""
    numbers = []
    for manifest in storage.list_dir(storage.join(uri, "_versions")):
        stem = manifest.removesuffix(".manifest")
        if manifest.endswith(".manifest") and stem.isdigit():
            n = int(stem)
            numbers.append(2**64 - 1 - n if n > 2**63 else n)
    return sorted(numbers)


def damaged_table(uri: storage.Location, exc: BaseException) -> StoreDamaged:
    """One line: which table is damaged, Lance's reason, and the versions that may still open."""
    why = _LANCE_SOURCE.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    versions = versions_on_disk(uri)
    hint = (
        f"earlier versions may still open with --version N (on disk: {', '.join(map(str, versions[-6:]))})"
        if versions else "no version manifests on disk: restore the table from a copy or rebuild it"
    )
    return StoreDamaged(f"the store's {_table_name(uri)!r} table is damaged ({uri}: {why[:300]}); {hint}")


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


def check_writable(root: storage.Location) -> None:
    """Refuse at once when the store's folder cannot be written (read-only mount, no permission; on object
    storage: no access, no bucket, no endpoint)."""
    root = storage.location(root)
    if storage.is_uri(root):
        storage.check_access(root, write=True)
        return
    existing = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    if not existing.is_dir():  # not a permission problem: nothing can be stored (or read) there
        what = f"{root} is a file" if existing == root else f"{existing} (on the way to {root}) is a file"
        raise StoreNotFound(f"{what}, not a folder: no store can be made there; point --store at a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".merg-write-check-"):
            pass
    except OSError as exc:
        raise StoreReadOnly(
            f"the store at {root} cannot be written ({existing}: {exc.strerror or exc}); write commands refuse, "
            "read commands (merg store stats/query/export, --version) still work"
        ) from exc
