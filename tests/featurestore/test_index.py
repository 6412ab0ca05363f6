from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from featurestore import index as warm
from featurestore.index import WarmIndex
from featurestore.store import Store
from featurestore.synthetic import synthetic_utterances

DIM = 32


@pytest.fixture()
def filled(tmp_path):
    store = Store.open(tmp_path / "store", create=True, embedding_dim=DIM)
    store.write_utterances(synthetic_utterances(3000, DIM, seed=4))
    return store


def _keys(table: pa.Table) -> list[str]:
    return table.column("key").to_pylist()


def _recall(got: pa.Table, exact: pa.Table) -> float:
    return len(set(_keys(got)) & set(_keys(exact))) / max(1, exact.num_rows)


@pytest.mark.parametrize(
    "where, path",
    [
        ("emotion = 'fear'", "exact"),  # ~3%: exact over the filtered rows
        ("emotion = 'neutral'", "reduced"),  # ~47%: reduced scan + exact re-rank
        ("split = 'train' AND speaker = 'Ross'", "exact"),  # not a group: resolved by Lance, gathered
        (None, "reduced"),
    ],
)
def test_warm_answers_match_lance_exact_search(filled, where, path):
    index = WarmIndex.build(filled, "fused_emb", exact_rows=600, reduced_dim=4, candidates=64)
    assert (index._rows(where).reduced is None) == (path == "exact")
    keys = _keys(filled.query(columns=["key"], where=where))
    recalls = []
    for key in keys[:: max(1, len(keys) // 20)]:
        got = index.similar(key, k=10, where=where)
        exact = filled.similar(key, k=10, where=where, warm=False, use_index=False)
        assert key not in _keys(got) and got.num_rows == 10
        assert got.column_names == exact.column_names
        assert np.all(np.diff(got.column("_distance").to_numpy()) >= 0)
        recalls.append(_recall(got, exact))
        if _keys(got) == _keys(exact):
            np.testing.assert_allclose(got.column("_distance").to_numpy(), exact.column("_distance").to_numpy(), atol=1e-5)
    assert np.mean(recalls) >= 0.99


def test_reduction_widens_until_the_recall_target(filled):
    index = WarmIndex.build(filled, "fused_emb", exact_rows=100, reduced_dim=1, candidates=10, target_recall=0.99)
    assert index.reduced_dim > 1
    assert index.estimated_recall >= 0.99 or index.reduced_dim == DIM


def test_vector_query_and_unknown_key(filled):
    index = WarmIndex.build(filled, "audio_emb")
    query = np.random.default_rng(0).normal(size=DIM).astype(np.float32)
    got = index.similar(query * 7.0, k=5, where="emotion = 'joy'")  # scale does not matter to cosine
    exact = filled.similar(query, k=5, column="audio_emb", where="emotion = 'joy'", warm=False)
    assert _keys(got) == _keys(exact)
    with pytest.raises(KeyError):
        index.similar("train/dia999999_utt0")


def test_store_similar_warms_on_repeated_asks_and_rebuilds_after_a_write(filled):
    key = _keys(filled.query(columns=["key"], limit=1))[0]
    slot = (str(filled.root.resolve()), None, "fused_emb")
    answers = [filled.similar(key, k=5, where="emotion = 'sadness'") for _ in range(warm.WARM_AFTER)]
    assert isinstance(warm._WARM[slot], WarmIndex)
    assert all(_keys(a) == _keys(answers[0]) for a in answers)
    before = warm._WARM[slot]
    filled.write_utterances(synthetic_utterances(10, DIM, seed=5, start=9000))
    filled.similar(key, k=5)
    assert warm._WARM[slot] is not before and warm._WARM[slot].version == filled.version
    with pytest.raises(KeyError):  # an unknown key still says so, through Lance's path
        filled.similar("train/dia999999_utt0", warm=True)
