from __future__ import annotations

import pyarrow as pa
import pytest

from featurestore.schema import (
    EMOTIONS,
    FAILURES_SCHEMA,
    SCHEMA_VERSION,
    utterance_key,
    utterances_schema,
    validate_utterances,
)


def test_embedding_columns_are_fixed_size_float32_lists():
    schema = utterances_schema(1024, fused_dim=2048)
    assert schema.field("audio_emb").type == pa.list_(pa.float32(), 1024)
    assert schema.field("fused_emb").type == pa.list_(pa.float32(), 2048)
    assert schema.metadata[b"merg.schema_version"] == str(SCHEMA_VERSION).encode()
    assert FAILURES_SCHEMA.names == ["key", "stage", "reason", "detail", "attempts", "last_seen"]


def test_label_ids_are_stable():
    # ids are part of the contract with training; reordering would silently relabel data
    assert EMOTIONS == ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
    assert utterance_key("dev", 3, 12) == "dev/dia3_utt12"


def test_validation_keeps_last_duplicate_and_derives_ids():
    table = pa.table({
        "key": ["train/dia1_utt0", "train/dia1_utt0", "train/dia2_utt0"],
        "emotion": ["joy", "fear", "neutral"],
        "sentiment": ["positive", "negative", "neutral"],
    })
    valid, rejected = validate_utterances(table, 4)
    assert not rejected
    assert valid.column("key").to_pylist() == ["train/dia1_utt0", "train/dia2_utt0"]
    assert valid.column("emotion_id").to_pylist() == [6, 0]
    assert valid.schema.field("fused_emb").type == pa.list_(pa.float32(), 4)


@pytest.mark.parametrize("vector, reason", [([1.0] * 3, "embedding_width"), ([1.0, float("nan"), 0, 0], "non_finite_embedding")])
def test_validation_rejects_bad_vectors_in_fixed_and_variable_lists(vector, reason):
    for kind in (pa.list_(pa.float32()), pa.list_(pa.float32(), len(vector))):
        table = pa.table({
            "key": ["test/dia0_utt0", "test/dia0_utt1"],
            "emotion": ["joy", "joy"],
            "sentiment": ["positive", "positive"],
            "vision_emb": pa.array([vector, None], kind),
        })
        valid, rejected = validate_utterances(table, 4)
        assert [(r.key, r.reason) for r in rejected] == [("test/dia0_utt0", reason)]
        assert valid.column("key").to_pylist() == ["test/dia0_utt1"]
