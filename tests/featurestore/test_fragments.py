"""Workers write fragments, one process commits them: exactly once by key, and store upkeep."""

from __future__ import annotations

import threading
from datetime import timedelta

import lance
import numpy as np
import pyarrow as pa
import pytest

from featurestore.store import Store, write_fragments
from featurestore.synthetic import synthetic_utterances

DIM = 16


@pytest.fixture()
def store(tmp_path):
    return Store.open(tmp_path / "store", create=True, embedding_dim=DIM)


def _keys(store: Store) -> list[str]:
    return store.query(columns=["key"]).column("key").to_pylist()


def _data_files(store: Store) -> int:
    return sum(1 for _ in (store.root / "utterances.lance" / "data").glob("*.lance"))


def test_fragments_are_invisible_until_committed_and_a_rewrite_after_a_kill_stores_each_key_once(store):
    """A worker killed after writing its fragment but before the commit leaves files no version
    references; the re-run writes the keys again and commits them: each key once."""
    rows = synthetic_utterances(12, DIM, seed=1)
    orphan = write_fragments(store.root, rows, DIM, DIM)  # the kill: written, never committed
    assert orphan.fragments and _data_files(store) == 1 and _keys(store) == []
    again = write_fragments(store.root, rows, DIM, DIM)
    version = store.commit_fragments([again])
    keys = _keys(store)
    assert sorted(keys) == sorted(rows.column("key").to_pylist()) and len(set(keys)) == 12
    assert version == store.version and _data_files(store) == 2  # the orphan is still on disk, unreferenced


def test_a_recomputed_key_replaces_its_row(store):
    first = synthetic_utterances(10, DIM, seed=1)
    store.commit_fragments([write_fragments(store.root, first, DIM, DIM)])
    changed = first.slice(0, 4).set_column(first.column_names.index("text"), "text", pa.array(["recomputed"] * 4))
    store.commit_fragments([write_fragments(store.root, changed, DIM, DIM)])
    table = store.query(columns=["key", "text"])
    assert table.num_rows == 10 and len(set(table.column("key").to_pylist())) == 10
    texts = dict(zip(table.column("key").to_pylist(), table.column("text").to_pylist()))
    assert [texts[k] for k in changed.column("key").to_pylist()] == ["recomputed"] * 4
    # a caller that knows which keys were stored (as of a version) names them; the rest are not searched
    stored_version = store.version
    store.commit_fragments([write_fragments(store.root, changed, DIM, DIM)], replace=changed.column("key").to_pylist(), as_of=stored_version)
    assert store.query(columns=["key"]).num_rows == 10


def test_bad_rows_are_refused_by_the_worker_and_reported(store):
    rows = synthetic_utterances(5, DIM, seed=1).to_pylist()
    rows[2]["emotion"] = "happyish"
    written = write_fragments(store.root, rows, DIM, DIM)
    assert [r.reason for r in written.rejected] == ["unknown_emotion"] and len(written.keys) == 4
    store.commit_fragments([written])
    assert store.query(columns=["key"]).num_rows == 4


def test_racing_commits_of_the_same_keys_leave_one_row_each(store):
    """Writers committing the same new keys at once: Lance's rebase lets both in (it checks fragments,
    not keys); the commit that finds another writer in between deletes the older rows."""
    rows = synthetic_utterances(8, DIM, seed=3)
    written = [write_fragments(store.root, rows, DIM, DIM) for _ in range(4)]
    threads = [threading.Thread(target=store.commit_fragments, args=([w],)) for w in written]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = _keys(store)
    assert sorted(keys) == sorted(rows.column("key").to_pylist())


def test_duplicates_left_by_a_killed_committer_are_removed_keeping_the_newest(store):
    rows = synthetic_utterances(6, DIM, seed=2)
    store.commit_fragments([write_fragments(store.root, rows, DIM, DIM)])
    newer = rows.set_column(rows.column_names.index("text"), "text", pa.array(["newer"] * 6))
    # as a killed process would leave them: appended without the replacing deletes
    dataset = store.lance_dataset()
    lance.LanceDataset.commit(dataset, lance.LanceOperation.Append(write_fragments(store.root, newer, DIM, DIM).fragments),
                              read_version=dataset.version)  # fmt: skip
    assert store.query(columns=["key"]).num_rows == 12
    assert store.drop_duplicate_keys() == 6
    assert set(store.query(columns=["text"]).column("text").to_pylist()) == {"newer"}
    assert store.drop_duplicate_keys() == 0


def test_a_key_twice_in_one_commit_is_refused(store):
    rows = synthetic_utterances(3, DIM, seed=2)
    with pytest.raises(ValueError, match="two of the fragments"):
        store.commit_fragments([write_fragments(store.root, rows, DIM, DIM), write_fragments(store.root, rows, DIM, DIM)])


def test_optimize_compacts_refreshes_indexes_and_removes_old_untagged_versions(store):
    for i in range(6):  # the job's way: small fragments, one commit each
        store.commit_fragments([write_fragments(store.root, synthetic_utterances(20, DIM, seed=i, start=20 * i), DIM, DIM)])
    tagged = store.tag("before-upkeep")
    store.create_indexes(scalar=True)
    store.commit_fragments([write_fragments(store.root, synthetic_utterances(20, DIM, seed=9, start=200), DIM, DIM)])
    fragments, versions = len(store.lance_dataset().get_fragments()), len(store.versions())
    assert fragments >= 7

    report = store.optimize(retention=timedelta(0))
    dataset = store.lance_dataset()
    assert (report.fragments_before, report.fragments_after) == (fragments, 1) == (fragments, len(dataset.get_fragments()))
    assert report.versions_before == versions and report.versions_after < versions
    assert {v["version"] for v in store.versions()} == {tagged, dataset.version}  # the tagged version stays
    assert Store.open(store.root, version="before-upkeep").query(columns=["key"]).num_rows == 120
    indexed = {i.field_names[0]: i.num_rows_indexed for i in dataset.describe_indices()}
    assert indexed == {"emotion": 140, "sentiment": 140, "split": 140, "key": 140}  # the last commit's rows too
    assert store.query(columns=["key"]).num_rows == 140
    joy = store.query(emotion="joy", columns=["key"]).num_rows
    assert joy == int(np.sum(np.array(store.query(columns=["emotion"]).column("emotion").to_pylist()) == "joy")) > 0


def test_small_fragments_are_merged_during_a_job_without_losing_or_repeating_a_key(store):
    from pipelines.job import FragmentCommitter, WrittenBatch

    committer = FragmentCommitter(store, interval_s=0.0, max_rows=10_000, compact_every=4)
    for i in range(9):
        written = write_fragments(store.root, synthetic_utterances(4, DIM, seed=i, start=4 * i), DIM, DIM)
        committer.add(WrittenBatch(written, written.keys, [], written.keys, 4))
        committer.commit()
    assert len(store.lance_dataset().get_fragments()) <= 3  # 9 fragments of 4 rows: two merges of 4, one left
    again = write_fragments(store.root, synthetic_utterances(4, DIM, seed=0, start=0), DIM, DIM)  # recomputed keys
    committer.add(WrittenBatch(again, again.keys, [], again.keys, 4))
    committer.commit()
    keys = _keys(store)
    assert len(keys) == len(set(keys)) == 36
