"""Object storage: a real S3 server (SeaweedFS, the `s3_server` fixture), pyarrow, Lance and the store on it."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from featurestore import storage
from featurestore.store import Store, StoreNotFound, write_fragments
from featurestore.synthetic import synthetic_utterances

REPO = Path(__file__).resolve().parents[2]


def test_local_paths_and_uris():
    assert storage.location("data/store") == Path("data/store") and storage.location(Path("x")) == Path("x")
    assert storage.location("s3://bucket/store/") == "s3://bucket/store"
    assert storage.join("s3://b/store", "utterances.lance") == "s3://b/store/utterances.lance"
    assert storage.join(Path("data/store"), "utterances.lance") == Path("data/store/utterances.lance")
    assert storage.lance_options(Path("data/store")) is None
    with pytest.raises(storage.StorageError, match="ftp:// is not supported"):
        storage.location("ftp://host/store")


def test_pyarrow_and_lance_work_against_the_server(s3, s3_server):
    """As a new user would check it: pyarrow's S3 filesystem and Lance's write_dataset, merge_insert
    and compact_files, with nothing but the standard AWS variables set."""
    fs = pafs.S3FileSystem(access_key=s3_server.access_key, secret_key=s3_server.secret_key, endpoint_override=s3_server.endpoint,
                           scheme="http", region="us-east-1")  # fmt: skip
    path = s3.removeprefix("s3://") + "/hello.txt"
    with fs.open_output_stream(path) as out:
        out.write(b"hello")
    assert fs.open_input_stream(path).read() == b"hello"

    uri, options = f"{s3}/t.lance", storage.lance_options(s3)
    assert options["aws_endpoint"] == s3_server.endpoint and options["allow_http"] == "true"
    lance.write_dataset(pa.table({"key": ["a", "b"], "v": [1, 2]}), uri, storage_options=options)
    lance.write_dataset(pa.table({"key": ["c"], "v": [3]}), uri, mode="append", storage_options=options)
    dataset = lance.dataset(uri, storage_options=options)
    dataset.merge_insert("key").when_matched_update_all().when_not_matched_insert_all().execute(pa.table({"key": ["b", "d"], "v": [20, 4]}))
    dataset = lance.dataset(uri, storage_options=options)
    assert dict(zip(*dataset.to_table().to_pydict().values())) == {"a": 1, "b": 20, "c": 3, "d": 4}
    assert dataset.optimize.compact_files().fragments_removed >= 2
    assert len(lance.dataset(uri, storage_options=options).get_fragments()) == 1


def test_the_store_on_s3(s3):
    store = Store.open(f"{s3}/store", create=True, embedding_dim=16)
    rows = synthetic_utterances(40, 16, seed=1)
    store.write_utterances(rows.slice(0, 20))  # the driver's way (text-only rows)
    store.commit_fragments([write_fragments(store.root, rows.slice(20), 16, 16)])  # a worker's way
    store.record_failures([("train/dia0_utt0", "decode", "truncated", "")])
    again = Store.open(f"{s3}/store/")
    assert again.root == f"{s3}/store" and again.query(columns=["key"]).num_rows == 40
    joy = sum(e == "joy" for e in rows.column("emotion").to_pylist())
    assert again.query(emotion="joy", columns=["key"]).num_rows == joy
    assert again.stats().failures[("decode", "truncated")] == 1
    tagged = again.tag("v-test")
    report = again.optimize(retention=timedelta(0))
    assert report.fragments_after == 1 and Store.open(f"{s3}/store", version="v-test").version == tagged
    assert len(again.similar(rows.column("key")[0].as_py(), k=3)) == 3
    with pytest.raises(StoreNotFound):
        Store.open(f"{s3}/nothing-here")


def test_a_wrong_key_a_missing_bucket_and_an_unreachable_endpoint_fail_in_one_line(s3, monkeypatch):
    Store.open(f"{s3}/store", create=True, embedding_dim=16)
    cases = {
        "secret": ({"AWS_SECRET_ACCESS_KEY": "wrong"}, f"{s3}/store", "access denied by http://127.0.0.1:"),
        "bucket": ({}, "s3://no-such-bucket/store", "bucket 'no-such-bucket' does not exist"),
        "endpoint": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, f"{s3}/store", "cannot reach the endpoint http://127.0.0.1:9"),
    }
    for name, (env, uri, message) in cases.items():
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            with pytest.raises(storage.StorageError, match=message) as raised:
                Store.open(uri)
            assert str(raised.value).startswith(f"{uri}: ") and "\n" not in str(raised.value), name
            done = subprocess.run([sys.executable, "-m", "infra.cli", "store", "stats", "--store", uri],
                                  capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
            first = done.stderr.strip().splitlines()[0]
            assert done.returncode == 1 and first.startswith(f"error: merg store stats failed: {uri}: "), (name, done.stderr)
            assert message in first and "log" in done.stderr.strip().splitlines()[1], (name, done.stderr)
