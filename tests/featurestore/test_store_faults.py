"""Machine faults at the store: a damaged table, a read-only store. Each says which table or store,
in one line, and nothing stored is lost."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest

from featurestore.store import Store, StoreDamaged, StoreReadOnly, explain_store_error, versions_on_disk
from featurestore.synthetic import synthetic_utterances

DAMAGE = ("garbage_folder", "deleted_data_file", "truncated_manifest", "truncated_data_file")


def make_store(root: Path) -> Path:
    """A store with three versions of its utterances table (create, then two writes)."""
    store = Store.open(root, create=True, embedding_dim=8)
    store.write_utterances(synthetic_utterances(6, 8, seed=1))
    store.write_utterances(synthetic_utterances(6, 8, seed=2, start=6))
    return root


def damage(root: Path, kind: str) -> None:
    table = root / "utterances.lance"
    if kind == "garbage_folder":  # something else's files where the table should be
        shutil.rmtree(table)
        table.mkdir()
        (table / "notes.txt").write_text("not a lance table")
    elif kind == "deleted_data_file":
        sorted((table / "data").iterdir(), key=lambda p: p.stat().st_mtime)[-1].unlink()
    elif kind == "truncated_manifest":  # Lance names manifests 2**64 - 1 - version: the newest sorts first
        newest = sorted((table / "_versions").glob("*.manifest"))[0]
        newest.write_bytes(newest.read_bytes()[:40])
    elif kind == "truncated_data_file":  # the manifest opens; reading the rows fails (issue 27)
        newest = sorted((table / "data").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
        newest.write_bytes(newest.read_bytes()[:100])


def _damage_message(root: Path) -> str:
    with pytest.raises(Exception) as caught:
        Store.open(root).stats()
    message = explain_store_error(caught.value)
    assert message is not None, f"not recognised as damage: {caught.value!r}"
    return message


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_table_is_named_with_the_versions_to_open(tmp_path, kind):
    root = make_store(tmp_path / "store")
    damage(root, kind)
    message = _damage_message(root)
    assert "the store's 'utterances' table is damaged" in message and "\n" not in message
    assert ".rs:" not in message  # lance's Rust source locations are dropped
    if kind == "garbage_folder":
        assert "no version manifests on disk" in message
    else:
        assert "--version N (on disk: 1, 2, 3)" in message
    if kind == "truncated_manifest":  # the earlier version still opens, with its rows
        assert Store.open(root, version=2).query(columns=["key"]).num_rows == 6


def test_unknown_version_is_not_called_damage(tmp_path):
    root = make_store(tmp_path / "store")
    with pytest.raises(Exception) as caught:
        Store.open(root, version=99)
    assert not isinstance(caught.value, StoreDamaged) and "no version or tag 99" in str(caught.value)
    assert versions_on_disk(root / "utterances.lance") == [1, 2, 3]


@contextlib.contextmanager
def read_only_mount(source: Path, target: Path):
    """`source` mounted read-only at `target` (a bind mount; needs root), skipped where it cannot mount."""
    target.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root and mount rights): read-only store untested")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here: read-only store untested")
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_read_only_store_reads_and_refuses_writes_at_once(tmp_path):
    root = make_store(tmp_path / "store")
    with read_only_mount(root, tmp_path / "ro") as ro:
        store = Store.open(ro)
        assert store.query(columns=["key"]).num_rows == 12 and store.stats().rows == 12
        with pytest.raises(StoreReadOnly, match=r"cannot be written \(.*Read-only file system\); write commands refuse"):
            store.write_utterances(synthetic_utterances(1, 8, seed=3, start=50))
        with pytest.raises(StoreReadOnly):
            store.tag("nope")
    assert Store.open(root).query(columns=["key"]).num_rows == 12


def test_a_record_table_whose_creation_stopped_before_its_first_commit_reads_empty_and_is_created_again(tmp_path):
    """A full disk or a kill during a record table's creation leaves Lance's folders without a manifest:
    nothing was committed, so it reads as empty and the next write creates it (a foreign file still
    makes it damaged)."""
    from featurestore.schema import SWEEP_CELLS

    root = make_store(tmp_path / "store")
    partial = root / f"{SWEEP_CELLS}.lance"
    (partial / "data").mkdir(parents=True)
    (partial / "data" / "half-written.lance").write_bytes(b"\0" * 10)
    store = Store.open(root)
    assert store.read_records(SWEEP_CELLS).num_rows == 0
    store.write_records(SWEEP_CELLS, [dict(id="s:c", sweep="s", cell="c")])
    assert store.read_records(SWEEP_CELLS).to_pylist()[0]["cell"] == "c"

    shutil.rmtree(partial)
    partial.mkdir()
    (partial / "notes.txt").write_text("not a lance table")
    with pytest.raises(StoreDamaged):
        store.read_records(SWEEP_CELLS)


def test_a_store_whose_creation_stopped_before_its_first_commit_is_created_again(tmp_path):
    """The same rule for the store's own tables: `Store.open(create=True)` over an utterances folder
    holding only Lance's folders and no manifest creates the store instead of calling it damaged."""
    root = tmp_path / "store"
    (root / "utterances.lance" / "data").mkdir(parents=True)
    (root / "utterances.lance" / "data" / "half-written.lance").write_bytes(b"\0" * 10)
    with pytest.raises(StoreDamaged):
        Store.open(root)  # without create: nothing to read, said as damage
    store = Store.open(root, create=True, embedding_dim=8)
    store.write_utterances(synthetic_utterances(3, 8, seed=1))
    assert Store.open(root).query(columns=["key"]).num_rows == 3
