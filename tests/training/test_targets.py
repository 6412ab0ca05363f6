import pytest

from featurestore.schema import TARGETS
from featurestore.store import Store
from infra.config import TargetsConfig
from training.targets import build_targets, clean_reply, dialogue_examples

from tests.conftest import DIM, dialogue_rows


def test_pairs_stay_within_dialogues_with_bounded_history():
    rows = dialogue_rows(2, 5).to_pylist()
    examples = list(dialogue_examples(rows, max_history=3))
    assert len(examples) == 8  # 4 pairs per 5-turn dialogue
    first, last = examples[0], examples[3]
    assert first["key"] == "train/dia0_utt0" and first["next_key"] == "train/dia0_utt1"
    assert first["history"] == [f"{rows[0]['speaker']}: {rows[0]['text']}"] and first["target"] == rows[1]["text"]
    assert len(last["history"]) == 3 and last["history"][-1].endswith(rows[3]["text"])
    assert last["next_speaker"] == rows[4]["speaker"] and last["next_emotion"] == rows[4]["emotion"]
    assert all(e["key"].split("_")[0] == e["next_key"].split("_")[0] for e in examples)


@pytest.mark.parametrize(
    "raw, clean",
    [("Rachel: Oh honey, I'm so sorry.\nMore text", "Oh honey, I'm so sorry."),
     ('"That is great! Really great. Truly great."', "That is great! Really great."),
     ("  ", "")],
)  # fmt: skip
def test_clean_reply(raw, clean):
    assert clean_reply(raw) == clean


def test_next_utterance_targets_are_written_once(tmp_path):
    store = Store.open(tmp_path, create=True, embedding_dim=DIM)
    store.write_utterances(dialogue_rows(16, 4))
    for _ in range(2):
        report = build_targets(store, TargetsConfig(kind="next_utterance"), tmp_path)
    assert report.written == {"train": 36, "dev": 6, "test": 6}
    table = store.read_records(TARGETS)
    assert table.num_rows == 48 and len(set(table.column("id").to_pylist())) == 48
    assert set(table.column("source").to_pylist()) == {"meld"}


def test_teacher_targets_record_settings_and_resume(tmp_path, tiny_llm):
    store = Store.open(tmp_path, create=True, embedding_dim=DIM)
    store.write_utterances(dialogue_rows(16, 4))
    config = TargetsConfig(kind="teacher", teacher_model=str(tiny_llm), splits=["dev"], max_new_tokens=8, teacher_batch_size=4)
    first = build_targets(store, config, tmp_path)
    assert sum(first.written.values()) + first.failed == 6
    assert '"teacher": "' in first.source and '"max_new_tokens": 8' in first.source
    second = build_targets(store, config, tmp_path)
    assert second.skipped == sum(first.written.values())  # finished rows are not generated again
    assert store.targets("teacher").num_rows == sum(first.written.values())
