from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from featurestore.schema import EMOTIONS, SENTIMENTS
from pipelines.meld import CSV_COLUMNS, MeldFormatError, fix_text, read_split, read_splits
from pipelines.synth.faults import mojibake_cp1252, mojibake_double


def _write_csv(path: Path, rows: list[list[object]], header=CSV_COLUMNS, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding=encoding, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _row(sr, text, dia=0, utt=0, emotion="neutral", sentiment="neutral", speaker="Ross"):
    return [sr, text, speaker, emotion, sentiment, dia, utt, 1, 1, "00:00:01,000", "00:00:02,000"]


@pytest.mark.meld_text
def test_reads_all_real_meld_rows(meld_text_dir):
    readings = read_splits(meld_text_dir)
    assert {s: len(r.records) for s, r in readings.items()} == {"train": 9989, "dev": 1109, "test": 2610}
    assert all(not r.bad_rows for r in readings.values())
    records = [rec for r in readings.values() for rec in r.records]
    assert {rec.emotion for rec in records} == set(EMOTIONS)
    assert {rec.sentiment for rec in records} == set(SENTIMENTS)
    assert len({rec.key for rec in records}) == 13708  # keys are unique across splits
    assert {rec.clip_status for rec in records} == {"no_media"}  # text only: no clip folders there
    first = readings["dev"].records[0]
    assert (first.key, first.speaker, first.text) == ("dev/dia0_utt0", "Phoebe", "Oh my God, he’s lost it. He’s totally lost it.")


@pytest.mark.meld_text
def test_mojibake_copy_of_real_csv_reads_the_same(meld_text_dir, tmp_path):
    """MELD.Raw's copies show `â€™`/`Â’` mojibake; both must read exactly like the clean copy."""
    clean = read_split(meld_text_dir, "dev").records
    original = (meld_text_dir / "dev_sent_emo.csv").read_text(encoding="utf-8")
    for damage, name in ((mojibake_cp1252, "a"), (mojibake_double, "b")):
        damaged = tmp_path / name / "dev_sent_emo.csv"
        damaged.parent.mkdir()
        damaged.write_text(damage(original), encoding="utf-8")
        assert "â€™" in damaged.read_text(encoding="utf-8") or "Â’" in damaged.read_text(encoding="utf-8")
        assert read_split(damaged.parent, "dev").records == clean


@pytest.mark.parametrize(
    "damaged, clean",
    [
        ("Oh my God, heâ€™s lost it.", "Oh my God, he’s lost it."),
        ("Oh. ThatÂ’s so Monica can keep track.", "Oh. That’s so Monica can keep track."),
        ("I donÂ’t know", "I don’t know"),
        ("â€œHi!â€\x9d", "“Hi!”"),
        ("Well, reallyâ€¦", "Well, really…"),
        ("He’s fine.", "He’s fine."),  # clean text, curly quote kept
        ("  padded  ", "padded"),
    ],
)
def test_fix_text_repairs_known_mojibake(damaged, clean):
    assert fix_text(damaged) == clean


def test_missing_column_error_names_column_and_file(tmp_path):
    header = [c for c in CSV_COLUMNS if c != "Emotion"]
    _write_csv(tmp_path / "train_sent_emo.csv", [], header=header)
    with pytest.raises(MeldFormatError, match=r"train_sent_emo\.csv.*Emotion"):
        read_split(tmp_path, "train")


def test_missing_csv_is_a_clear_error(tmp_path):
    with pytest.raises(MeldFormatError, match="test_sent_emo.csv"):
        read_split(tmp_path, "test")


def test_quoted_newlines_commas_and_cp1252_file(tmp_path):
    text = 'He said, "no,\nno, no!"'
    _write_csv(tmp_path / "train_sent_emo.csv", [_row(1, text), _row(2, "It’s fine.", utt=1)], encoding="cp1252")
    records = read_split(tmp_path, "train").records
    assert [r.text for r in records] == [text, "It’s fine."]


def test_rows_without_clip_are_reported_not_dropped(tmp_path):
    _write_csv(tmp_path / "dev_sent_emo.csv", [_row(1, "a", utt=0), _row(2, "b", utt=1)])
    (tmp_path / "dev_splits_complete").mkdir()
    (tmp_path / "dev_splits_complete" / "dia0_utt0.mp4").write_bytes(b"x")
    records = read_split(tmp_path, "dev").records
    assert [(r.key, r.clip_status) for r in records] == [("dev/dia0_utt0", "found"), ("dev/dia0_utt1", "missing")]
    assert records[0].clip_path == tmp_path / "dev_splits_complete" / "dia0_utt0.mp4"
    assert records[1].clip_path is None


def test_bad_rows_are_recorded_and_the_rest_read(tmp_path):
    _write_csv(tmp_path / "train_sent_emo.csv", [_row(1, "ok"), _row(2, "bad", dia="x"), _row(3, "ok too", utt=2)])
    reading = read_split(tmp_path, "train")
    assert [r.text for r in reading.records] == ["ok", "ok too"]
    assert len(reading.bad_rows) == 1 and "ValueError" in reading.bad_rows[0][1]


def test_split_subfolder_layout(tmp_path):
    """MELD.Raw may keep a split's CSV and clips under a folder named after the split."""
    _write_csv(tmp_path / "train" / "train_sent_emo.csv", [_row(1, "hi")])
    (tmp_path / "train" / "train_splits").mkdir()
    shutil.copyfile(__file__, tmp_path / "train" / "train_splits" / "dia0_utt0.mp4")
    (record,) = read_split(tmp_path, "train").records
    assert record.clip_status == "found"


def test_unknown_split_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        read_split(tmp_path, "validation")
