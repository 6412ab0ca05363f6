from __future__ import annotations

import multiprocessing as mp
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from featurestore.schema import EMOTION_ID, META_VERSION, utterances_schema
from featurestore.store import SchemaVersionMismatch, Store, StoreError, StoreNotFound, build_filter
from featurestore.synthetic import synthetic_utterances

DIM = 16


@pytest.fixture()
def store(tmp_path):
    return Store.open(tmp_path / "store", create=True, embedding_dim=DIM)


def _keys(table: pa.Table) -> list[str]:
    return table.column("key").to_pylist()


def test_schema_round_trip(store):
    rows = synthetic_utterances(50, DIM, seed=1)
    store.write_utterances(rows)
    back = store.query()
    assert back.schema.equals(utterances_schema(DIM), check_metadata=False)
    assert back.schema.field("fused_emb").type == pa.list_(pa.float32(), DIM)  # real fixed_size_list
    back = back.sort_by("key")
    rows = rows.sort_by("key")
    for column in ("key", "split", "speaker", "text", "emotion", "sentiment", "face_visible"):
        assert back.column(column).to_pylist() == rows.column(column).to_pylist(), column
    np.testing.assert_array_equal(
        np.stack(back.column("fused_emb").to_numpy(zero_copy_only=False)),
        np.stack(rows.column("fused_emb").to_numpy(zero_copy_only=False)),
    )
    assert back.column("emotion_id").to_pylist() == [EMOTION_ID[e] for e in rows.column("emotion").to_pylist()]
    assert back.column("created_at").null_count == 0
    reopened = Store.open(store.root)
    assert (reopened.embedding_dim, reopened.fused_dim, reopened.query().num_rows) == (DIM, DIM, 50)


def test_rewrite_is_exactly_once(store):
    rows = synthetic_utterances(40, DIM, seed=2)
    first = store.write_utterances(rows)
    again = store.write_utterances(rows)
    assert (first.inserted, first.updated) == (40, 0)
    assert (again.inserted, again.updated) == (0, 40)
    extra = synthetic_utterances(10, DIM, seed=3, start=40)
    store.write_utterances(pa.concat_tables([rows.slice(0, 5), extra]))
    keys = _keys(store.query(columns=["key"]))
    assert len(keys) == len(set(keys)) == 50


def test_update_replaces_a_row(store):
    rows = synthetic_utterances(5, DIM, seed=2, modalities=False)
    store.write_utterances(rows)
    key = rows.column("key")[0].as_py()
    store.write_utterances([dict(key=key, split=key.split("/")[0], emotion="fear", sentiment="negative", text="new")])
    row = store.query(where=build_filter(key=key)).to_pylist()[0]
    assert (row["text"], row["emotion"], row["emotion_id"]) == ("new", "fear", EMOTION_ID["fear"])
    assert store.query().num_rows == 5


def test_bad_rows_recorded_rest_written(store):
    good = synthetic_utterances(6, DIM, seed=4, modalities=False).to_pylist()
    bad = [
        dict(good[0], key="train/dia900_utt0", fused_emb=[0.1] * (DIM - 1)),
        dict(good[0], key="train/dia901_utt0", fused_emb=[float("nan")] + [0.0] * (DIM - 1)),
        dict(good[0], key="train/dia902_utt0", fused_emb=[float("inf")] * DIM),
        dict(good[0], key="train/dia903_utt0", emotion="happiness"),
        dict(good[0], key="train/dia904_utt0", sentiment="mixed"),
        dict(good[0], key="dia905_utt0"),
    ]
    result = store.write_utterances(good[:3] + bad + good[3:])
    assert result.inserted == 6
    assert sorted((r.key, r.reason) for r in result.rejected) == [
        ("dia905_utt0", "bad_key"),
        ("train/dia900_utt0", "embedding_width"),
        ("train/dia901_utt0", "non_finite_embedding"),
        ("train/dia902_utt0", "non_finite_embedding"),
        ("train/dia903_utt0", "unknown_emotion"),
        ("train/dia904_utt0", "unknown_sentiment"),
    ]
    failures = store.failures().to_pylist()
    assert {(f["key"], f["stage"], f["attempts"]) for f in failures} == {(r.key, "store", 1) for r in result.rejected}
    store.write_utterances(bad)  # seen again: attempts counted, not duplicated
    assert sorted(f["attempts"] for f in store.failures().to_pylist()) == [2] * 6
    store.clear_failures(["train/dia900_utt0"], stage="store")
    assert store.failures().num_rows == 5
    assert store.stats().failures[("store", "non_finite_embedding")] == 2


def test_unexpected_column_is_a_programming_error(store):
    with pytest.raises(ValueError, match="not in the utterances schema: colour"):
        store.write_utterances([dict(key="train/dia1_utt0", emotion="joy", sentiment="positive", colour="red")])


def test_schema_version_mismatch_says_what_to_do(tmp_path):
    store = Store.open(tmp_path / "s", create=True, embedding_dim=DIM)
    dataset = store.lance_dataset()
    dataset.update_schema_metadata({META_VERSION.decode(): "0"})
    with pytest.raises(SchemaVersionMismatch, match=r"schema version 0.*merg preprocess --store"):
        Store.open(tmp_path / "s")


def test_open_errors(tmp_path):
    with pytest.raises(StoreNotFound, match="no merg store"):
        Store.open(tmp_path / "absent")
    Store.open(tmp_path / "s", create=True, embedding_dim=DIM)
    with pytest.raises(StoreError, match="16-d"):
        Store.open(tmp_path / "s", embedding_dim=32)


def test_query_filters_match_pandas(store):
    rows = synthetic_utterances(300, DIM, seed=5, modalities=False)
    store.write_utterances(rows)
    frame = rows.to_pandas()
    got = store.query(emotion=["joy", "anger"], split="train", face_visible=True, columns=["key"])
    expected = frame[frame.emotion.isin(["joy", "anger"]) & (frame.split == "train") & frame.face_visible]
    assert sorted(_keys(got)) == sorted(expected.key)
    got = store.query(speaker="Ross", where="dialogue_id < 100", columns=["key"])
    assert sorted(_keys(got)) == sorted(frame[(frame.speaker == "Ross") & (frame.dialogue_id < 100)].key)
    assert store.query(speaker="O'Brien").num_rows == 0  # quotes are escaped, not injected


def _brute_force(rows: pa.Table, query: np.ndarray, mask: np.ndarray, k: int) -> list[str]:
    matrix = np.stack(rows.column("fused_emb").to_numpy(zero_copy_only=False))
    cosine = 1 - matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    cosine[~mask] = np.inf
    order = np.argsort(cosine, kind="stable")[:k]
    return [rows.column("key")[int(i)].as_py() for i in order]


def test_similar_matches_brute_force_with_prefilter(store):
    rows = synthetic_utterances(400, DIM, seed=6, modalities=False)
    store.write_utterances(rows)
    query = np.random.default_rng(0).normal(size=DIM).astype(np.float32)
    got = store.similar(query, k=10, where="emotion = 'sadness'")
    mask = np.array([e == "sadness" for e in rows.column("emotion").to_pylist()])
    assert _keys(got) == _brute_force(rows, query, mask, 10)
    assert np.all(np.diff(got.column("_distance").to_numpy()) >= 0)


def test_similar_by_key_excludes_itself(store):
    rows = synthetic_utterances(100, DIM, seed=7, modalities=False)
    store.write_utterances(rows)
    key = rows.column("key")[3].as_py()
    got = _keys(store.similar(key, k=5))
    assert key not in got and len(got) == 5
    mask = np.array([k != key for k in rows.column("key").to_pylist()])
    assert got == _brute_force(rows, store.vector_of(key), mask, 5)
    with pytest.raises(KeyError):
        store.similar("train/dia999999_utt0")


def test_indexes_keep_answers(store):
    rows = synthetic_utterances(1200, DIM, seed=8, modalities=False)
    store.write_utterances(rows)
    before = sorted(_keys(store.query(emotion="joy", columns=["key"])))
    built = store.create_indexes(scalar=True, vectors=True)
    assert any("BITMAP" in b for b in built) and any("IVF_PQ" in b for b in built)
    assert store.has_vector_index()
    assert sorted(_keys(store.query(emotion="joy", columns=["key"]))) == before
    recalls = []
    for i in range(0, 200, 10):
        query = store.vector_of(rows.column("key")[i].as_py())
        exact = set(_keys(store.similar(query, k=10, use_index=False)))
        recalls.append(len(exact & set(_keys(store.similar(query, k=10, warm=False)))) / 10)
    assert np.mean(recalls) >= 0.9  # the benchmark measures recall at scale


def test_versions_tags_and_reading_at_a_version(store):
    store.write_utterances(synthetic_utterances(10, DIM, seed=9))
    v_ten = store.version
    store.tag("train-run-1")
    store.write_utterances(synthetic_utterances(5, DIM, seed=9, start=10))
    assert store.query().num_rows == 15
    versions = store.versions()
    assert [v["rows"] for v in versions][-2:] == [10, 15]
    assert next(v for v in versions if v["version"] == v_ten)["tags"] == ["train-run-1"]
    old = Store.open(store.root, version="train-run-1")
    assert old.query().num_rows == 10 and old.version == v_ten
    assert store.at(v_ten).query().num_rows == 10
    with pytest.raises(StoreError, match="read-only"):
        old.write_utterances(synthetic_utterances(1, DIM))
    with pytest.raises(StoreError, match="no version or tag"):
        Store.open(store.root, version="nope")


def test_stats(store):
    rows = synthetic_utterances(200, DIM, seed=10, modalities=False)
    store.write_utterances(rows)
    stats = store.stats()
    frame = rows.to_pandas()
    assert stats.rows == 200
    assert stats.by_split_emotion["train"]["neutral"] == ((frame.split == "train") & (frame.emotion == "neutral")).sum()
    assert stats.face_visible["dev"]["visible"] == ((frame.split == "dev") & frame.face_visible).sum()
    assert stats.with_embeddings == {"audio_emb": 0, "vision_emb": 0, "fused_emb": 200}


def _append_worker(root: str, start: int, n: int, batch: int) -> None:
    store = Store.open(root)
    for offset in range(0, n, batch):
        store.write_utterances(synthetic_utterances(batch, DIM, seed=start + offset, start=start + offset))


@pytest.mark.slow
def test_concurrent_appends_from_two_processes_lose_nothing(store):
    ctx = mp.get_context("spawn")
    # overlapping key ranges: [0, 120) and [80, 200)
    workers = [ctx.Process(target=_append_worker, args=(str(store.root), s, 120, 20)) for s in (0, 80)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0
    keys = _keys(store.query(columns=["key"]))
    assert len(keys) == len(set(keys))
    assert {int(k.split("dia")[1].split("_")[0]) for k in keys} == set(range(200))


def _reader_worker(root: str, out: "mp.Queue") -> None:
    store = Store.open(root)
    seen = []
    for _ in range(40):
        keys = store.query(columns=["key"]).column("key").to_pylist()
        seen.append((len(keys), len(set(keys))))
    out.put(seen)


@pytest.mark.slow
def test_reader_during_writes_sees_whole_versions(store):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    reader = ctx.Process(target=_reader_worker, args=(str(store.root), queue))
    reader.start()
    _append_worker(str(store.root), 0, 200, 25)
    seen = queue.get(timeout=300)
    reader.join(timeout=60)
    assert all(n == unique and n % 25 == 0 for n, unique in seen), Counter(seen)


def test_racing_upserts_of_the_same_new_keys_never_duplicate(tmp_path):
    """Threads upserting the same new keys at once: Lance detects it only for declared primary keys."""
    import threading

    store = Store.open(tmp_path / "s", create=True, embedding_dim=16)
    rows = synthetic_utterances(60, 16, seed=1)
    threads = [threading.Thread(target=store.write_utterances, args=(rows,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.query(columns=["key"]).num_rows == 60


def test_an_older_store_gets_its_primary_key_declared(tmp_path):
    import lance

    from featurestore.schema import FAILURES_SCHEMA, PRIMARY_KEY

    root = tmp_path / "s"
    root.mkdir()
    for name, schema in (("utterances", utterances_schema(16)), ("failures", FAILURES_SCHEMA)):
        old = pa.schema([f.remove_metadata() for f in schema], metadata=schema.metadata)  # as stores made before
        lance.write_dataset(old.empty_table(), str(root / f"{name}.lance"), schema=old)
    Store.open(root)
    assert lance.dataset(str(root / "utterances.lance")).schema.field("key").metadata[PRIMARY_KEY.encode()] == b"true"
    assert lance.dataset(str(root / "failures.lance")).schema.field("stage").metadata[PRIMARY_KEY.encode()] == b"true"


def test_vectors_by_key_skip_rows_without_the_embedding(store):
    rows = synthetic_utterances(20, 16, seed=2)
    store.write_utterances(rows.drop_columns(["fused_emb"]).slice(0, 5))  # five text-only rows
    store.write_utterances(rows.slice(5))
    vectors = store.vectors("fused_emb", split="train")
    train = {k for k, s in zip(rows.column("key").to_pylist(), rows.column("split").to_pylist()) if s == "train"}
    assert set(vectors) == train - set(rows.column("key").to_pylist()[:5])
    key = next(iter(vectors))
    assert np.allclose(vectors[key], store.vector_of(key)) and vectors[key].shape == (16,)
