import pyarrow as pa
import pytest

from featurestore.schema import TARGETS
from featurestore.store import Store
from infra.config import TargetsConfig
from training.targets import build_targets, clean_reply, dialogue_examples

from tests.conftest import DIM, dialogue_rows


def _line(utterance_id, speaker, dialogue_id=0):
    return dict(key=f"train/dia{dialogue_id}_utt{utterance_id}", split="train", dialogue_id=dialogue_id,
                utterance_id=utterance_id, speaker=speaker, text=f"line {utterance_id}.", emotion="joy", sentiment="positive")  # fmt: skip


def test_a_reply_is_the_next_other_speakers_whole_turn_and_never_spans_a_missing_line():
    rows = [_line(0, "Ross"), _line(1, "Ross"), _line(2, "Rachel"), _line(3, "Rachel"), _line(4, "Ross"),
            _line(6, "Monica"), _line(7, "Ross"), _line(0, "Joey", dialogue_id=1)]  # fmt: skip
    examples = list(dialogue_examples(rows, max_history=2))
    assert [(e["key"], e["next_key"], e["target"]) for e in examples] == [
        ("train/dia0_utt1", "train/dia0_utt2", "line 2. line 3."),  # Ross's two lines -> Rachel's two lines
        ("train/dia0_utt3", "train/dia0_utt4", "line 4."),
        ("train/dia0_utt6", "train/dia0_utt7", "line 7."),  # utterance 5 is missing: no 4 -> 6 pair
    ]
    assert all(e["next_speaker"] != e["history"][-1].split(":")[0] for e in examples)
    assert examples[0]["history"] == ["Ross: line 0.", "Ross: line 1."] and len(examples[1]["history"]) == 2


def test_teacher_is_asked_for_a_reply_to_the_last_speaker():
    from training.targets import teacher_message

    example = next(dialogue_examples([_line(0, "Ross"), _line(1, "Ross"), _line(2, "Rachel")], max_history=4))
    assert teacher_message(example).endswith("What does Rachel reply to Ross? Answer with Rachel's words only.")


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
    pairs = list(dialogue_examples(dialogue_rows(16, 4).to_pylist(), max_history=8))
    assert report.written == {s: sum(e["split"] == s for e in pairs) for s in ("train", "dev", "test")}
    table = store.read_records(TARGETS)
    assert table.num_rows == len(pairs) and len(set(table.column("id").to_pylist())) == len(pairs)
    assert set(table.column("source").to_pylist()) == {"meld"}


def test_teacher_targets_record_settings_and_resume(tmp_path, tiny_llm):
    store = Store.open(tmp_path, create=True, embedding_dim=DIM)
    store.write_utterances(dialogue_rows(16, 4))
    config = TargetsConfig(kind="teacher", teacher_model=str(tiny_llm), splits=["dev"], max_new_tokens=8, teacher_batch_size=4)
    first = build_targets(store, config, tmp_path)
    dev_pairs = sum(e["split"] == "dev" for e in dialogue_examples(dialogue_rows(16, 4).to_pylist(), max_history=8))
    assert sum(first.written.values()) + first.failed == dev_pairs
    assert '"teacher": "' in first.source and '"max_new_tokens": 8' in first.source
    second = build_targets(store, config, tmp_path)
    assert second.skipped == sum(first.written.values())  # finished rows are not generated again
    assert store.targets("teacher").num_rows == sum(first.written.values())


def test_teacher_prompts_drop_the_oldest_lines_to_fit_and_a_last_line_too_long_is_recorded(tmp_path, tiny_llm):
    """The teacher fits each prompt as training does (oldest lines first, the reply's max_new_tokens
    kept within targets.max_length); a pair whose last line alone is too long is recorded and skipped."""
    rows = dialogue_rows(2, 12, splits=("dev",))
    texts = rows.column("text").to_pylist()
    texts[5] = "word " * 400  # one line far over max_length
    rows = rows.set_column(rows.column_names.index("text"), "text", pa.array(texts))
    store = Store.open(tmp_path, create=True, embedding_dim=DIM)
    store.write_utterances(rows)
    examples = list(dialogue_examples(rows.to_pylist(), max_history=8))
    huge = rows.column("key").to_pylist()[5]
    last_too_long = [e for e in examples if e["key"] == huge]  # whose prompt ends with it
    behind = [e for e in examples if e["key"] != huge and any("word word" in line for line in e["history"])]
    assert len(last_too_long) == 1 and len(behind) == 4  # the line ends a turn, and 4 later prompts hold it
    config = TargetsConfig(kind="teacher", teacher_model=str(tiny_llm), splits=["dev"], max_new_tokens=4, max_length=200)
    report = build_targets(store, config, tmp_path)
    assert report.too_long == len(last_too_long) and report.shortened >= len(behind)
    assert sum(report.written.values()) + report.failed + report.too_long == len(examples)
    failures = store.failures().to_pylist()
    assert [f["key"] for f in failures if f["reason"] == "prompt_too_long"] == [e["key"] for e in last_too_long]
