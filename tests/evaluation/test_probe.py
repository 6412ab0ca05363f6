"""`merg probe`: a linear emotion probe per feature of the store, stored and reused like cells."""

import json

import pyarrow as pa
import pytest

from evaluation.probe import FEATURES, probe, probe_table
from featurestore.schema import EMOTIONS, PROBE_RESULTS
from featurestore.store import Store


@pytest.mark.slow
def test_probe_scores_every_feature_against_the_majority_baseline_and_is_reused(eval_store):
    store = Store.open(eval_store)
    rows = probe(store, samples=50, cs=(1.0,))
    assert [r["feature"] for r in rows] == list(FEATURES) and all(r["status"] == "done" for r in rows)
    metrics = json.loads(rows[0]["metrics"])
    for result in (metrics["test"], metrics["majority"]):
        for name in ("weighted_f1", "accuracy"):
            lo, hi = result[name]["ci"]
            assert 0 <= lo <= result[name]["value"] <= hi <= 1
    assert set(metrics["per_class_f1"]) == set(EMOTIONS) and metrics["C"] == 1.0
    written = store.read_records(PROBE_RESULTS).num_rows
    again = probe(store, samples=50, cs=(1.0,))
    assert [r["id"] for r in again] == [r["id"] for r in rows] and store.read_records(PROBE_RESULTS).num_rows == written
    header, body = probe_table(store.read_records(PROBE_RESULTS).to_pylist())
    assert header[0] == "Feature" and [row[0] for row in body] == list(FEATURES)


def test_probe_skips_a_feature_the_store_lacks_with_the_reason(eval_store):
    store = Store.open(eval_store)
    table = store.query()
    index = table.column_names.index("vision_emb")
    store.write_utterances(table.set_column(index, "vision_emb", pa.nulls(table.num_rows, table.schema.field(index).type)))
    (row,) = probe(store, ["vision_emb"], samples=20, cs=(1.0,))
    assert row["status"] == "skipped" and "too few labelled utterances with vision_emb" in row["error"]


def test_weighted_f1_matches_sklearn():
    import numpy as np
    from sklearn.metrics import f1_score

    from evaluation.probe import weighted_f1

    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 7, 200), rng.integers(0, 5, 200)
    assert weighted_f1(truth, predicted) == pytest.approx(f1_score(truth, predicted, average="weighted", zero_division=0))
