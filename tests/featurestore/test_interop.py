"""The store answers the same query from lance, LanceDB, DuckDB, Polars and pandas."""

from __future__ import annotations

import duckdb
import lance
import lancedb
import numpy as np
import polars as pl
import pytest

from featurestore.store import Store
from featurestore.synthetic import synthetic_utterances

DIM = 8


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("interop") / "store", create=True, embedding_dim=DIM)
    store.write_utterances(synthetic_utterances(300, DIM, seed=11))
    expected = sorted(store.query(emotion="joy", split="train", columns=["key"]).column("key").to_pylist())
    assert expected
    return store, expected


def test_lance_directly(filled):
    store, expected = filled
    dataset = lance.dataset(str(store.root / "utterances.lance"))
    got = dataset.to_table(columns=["key"], filter="emotion = 'joy' AND split = 'train'")
    assert sorted(got.column("key").to_pylist()) == expected


def test_lancedb(filled):
    store, expected = filled
    table = lancedb.connect(str(store.root)).open_table("utterances")
    got = table.search().where("emotion = 'joy' AND split = 'train'").select(["key"]).limit(None).to_arrow()
    assert sorted(got.column("key").to_pylist()) == expected
    query = np.asarray(store.vector_of(expected[0]))
    nearest = table.search(query, vector_column_name="fused_emb").metric("cosine").limit(3).to_arrow()
    assert nearest.column("key")[0].as_py() == expected[0]


def test_duckdb_through_arrow(filled):
    store, expected = filled
    utterances = store.lance_dataset()  # noqa: F841 - DuckDB finds it by name and scans it (filter pushdown)
    got = duckdb.sql("SELECT key FROM utterances WHERE emotion = 'joy' AND split = 'train' ORDER BY key").fetchall()
    assert [k for (k,) in got] == expected
    counts = duckdb.sql("SELECT split, count(*) FROM utterances GROUP BY split").fetchall()
    assert sum(n for _, n in counts) == 300


def test_polars(filled):
    store, expected = filled
    frame = pl.scan_pyarrow_dataset(store.lance_dataset()).filter(
        (pl.col("emotion") == "joy") & (pl.col("split") == "train")
    ).select("key").collect()
    assert sorted(frame["key"].to_list()) == expected


def test_pandas(filled):
    store, expected = filled
    frame = store.query(columns=["key", "emotion", "split"]).to_pandas()
    assert sorted(frame[(frame.emotion == "joy") & (frame.split == "train")].key) == expected
