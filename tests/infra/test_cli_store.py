from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from featurestore.store import Store
from featurestore.synthetic import synthetic_utterances
from infra.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "store"
    store = Store.open(root, create=True, embedding_dim=16)
    store.write_utterances(synthetic_utterances(400, 16, seed=1))
    store.write_utterances([dict(key="train/dia9999_utt0", emotion="glee", sentiment="positive")])
    return root


def _run(*args: str):
    result = runner.invoke(app, list(args), terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_stats(store_dir):
    output = _run("store", "stats", "--store", str(store_dir))
    assert "400 utterances" in output and "unknown_emotion" in output and "neutral" in output


def test_query_and_similar(store_dir):
    output = _run("store", "query", "--store", str(store_dir), "--emotion", "joy", "--split", "train", "--limit", "3")
    assert "matching utterances (showing 3)" in output and "joy" in output
    key = Store.open(store_dir).query(emotion="joy", limit=1).column("key")[0].as_py()
    output = _run("store", "similar", key, "--store", str(store_dir), "--k", "4", "--where", "split = 'train'")
    assert "4 nearest" in output and "_distance" in output


def test_versions_tag_and_read_at_tag(store_dir):
    _run("store", "tag", "cli-test", "--store", str(store_dir))
    assert "cli-test" in _run("store", "versions", "--store", str(store_dir))
    assert "400 utterances" in _run("store", "stats", "--store", str(store_dir), "--version", "cli-test")


def test_index_and_export(store_dir, tmp_path):
    assert "IVF_PQ" in _run("store", "index", "--vectors", "--store", str(store_dir))
    _run("store", "export", "--store", str(store_dir), "--out", str(tmp_path / "joy.parquet"), "--emotion", "joy")
    exported = pq.read_table(tmp_path / "joy.parquet")
    assert exported.num_rows == Store.open(store_dir).query(emotion="joy").num_rows
    assert "fused_emb" in exported.column_names
    _run("store", "export", "--store", str(store_dir), "--out", str(tmp_path / "all.csv"))
    frame = pd.read_csv(tmp_path / "all.csv")
    assert len(frame) == 400 and "fused_emb" not in frame.columns


def test_missing_store_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["store", "stats", "--store", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no merg store" in result.output
