from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from featurestore.schema import EMOTIONS, SENTIMENTS
from infra.config import SynthConfig
from pipelines.meld import CSV_NAMES, read_splits, summarize
from pipelines.synth import generate, read_ground_truth
from pipelines.synth.faults import EXPECTED
from pipelines.synth.script import dialogues_per_split, script_from_bank, script_from_meld_text

MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
               "Season", "Episode", "StartTime", "EndTime"]  # fmt: skip


def test_csvs_match_meld_schema(mini_meld):
    for name in CSV_NAMES.values():
        with (mini_meld / name).open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == MELD_HEADER
        assert rows[1:], f"{name} has no rows"
        for row in rows[1:]:
            assert len(row) == len(MELD_HEADER)
            assert row[3] in EMOTIONS and row[4] in SENTIMENTS
            assert row[9].count(":") == 2 and "," in row[9]  # MELD's "HH:MM:SS,mmm"
        assert [int(r[0]) for r in rows[1:]] == list(range(1, len(rows)))


def test_clips_decode_with_decord_and_pyav(mini_meld):
    truth = read_ground_truth(mini_meld)
    clean = [t for t in truth.values() if t["fault"] is None]
    assert len(clean) >= 5
    for t in clean:
        path = str(mini_meld / t["clip"])
        assert 0.5 <= t["duration"] <= 6.0
        reader = decord.VideoReader(path)
        assert abs(len(reader) - t["n_frames"]) <= 1
        assert reader.get_avg_fps() == pytest.approx(t["fps"], rel=1e-3)
        assert reader[0].shape == (t["height"], t["width"], 3)
        with av.open(path) as container:
            assert container.streams.video[0].codec_context.name == "h264"
            audio = container.streams.audio[0]
            assert audio.codec_context.name == "aac" and audio.rate == 48000
            samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
            assert samples.size / audio.channels / audio.rate == pytest.approx(t["duration"], abs=0.1)
            assert np.abs(samples).max() > 0.01, "speech should be audible"


def test_ground_truth_records_speaker_face_and_boxes(mini_meld):
    truth = read_ground_truth(mini_meld)
    for t in truth.values():
        if t["fault"] in ("one_frame", "short_clip"):
            continue
        speakers = [f for f in t["faces"] if f["speaking"]]
        assert len(speakers) == 1 and t["faces"][t["speaker_face"]]["speaking"]
        assert 1 <= len(t["faces"]) <= 2
        for face in t["faces"]:
            assert len(face["boxes"]) == t["n_frames"]
            x0, y0, x1, y1 = face["boxes"][0]
            assert 0 <= x0 < x1 <= t["width"] and 0 <= y0 < y1 <= t["height"]
    assert any(len(t["faces"]) == 2 for t in truth.values()), "some clips must show a silent listener"


def test_speaking_mouth_moves_with_speech(mini_meld):
    """The speaking face's mouth region changes more during speech than the silent face's."""
    truth = read_ground_truth(mini_meld)
    t = next(t for t in truth.values() if t["fault"] is None and len(t["faces"]) == 2 and t["n_frames"] > 20)
    frames = decord.VideoReader(str(mini_meld / t["clip"])).get_batch(range(t["n_frames"])).asnumpy()
    motion = []
    for face in t["faces"]:
        diffs = []
        for i in range(1, len(frames)):
            x0, y0, x1, y1 = face["boxes"][i]
            mouth = slice(y0 + (y1 - y0) * 3 // 5, y1), slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4)
            diffs.append(np.abs(frames[i][mouth].astype(float) - frames[i - 1][mouth].astype(float)).mean())
        motion.append(np.mean(diffs))
    speaking, silent = motion[t["speaker_face"]], motion[1 - t["speaker_face"]]
    assert speaking > 1.5 * silent


def test_every_injected_fault_is_listed_and_reported(mini_meld):
    truth = read_ground_truth(mini_meld)
    injected = {t["key"]: t["fault"] for t in truth.values() if t["fault"]}
    assert sorted(injected.values()) == sorted(EXPECTED)
    readings = read_splits(mini_meld)
    records = {r.key: r for reading in readings.values() for r in reading.records}
    assert set(records) == set(truth), "every CSV row is read, none dropped"
    problems = {key: reason for key, reason, _ in summarize(readings).problems}
    for key, fault in injected.items():
        expected = EXPECTED[fault]
        if expected == "text_repaired":
            assert records[key].text == truth[key]["text"], fault
            assert key not in problems
        elif expected == "missing":
            assert records[key].clip_status == "missing" and problems[key] == "missing_file"
        else:
            assert problems.get(key) == expected, f"{key}: {fault} reported as {problems.get(key)}"
    assert set(problems) == {k for k, f in injected.items() if EXPECTED[f] != "text_repaired"}


def test_mojibake_is_really_in_the_csv(mini_meld):
    raw = "".join((mini_meld / name).read_text(encoding="utf-8") for name in CSV_NAMES.values())
    assert "â€™" in raw and "Â’" in raw


@pytest.mark.slow
def test_same_seed_gives_byte_identical_csvs(tmp_path):
    def make(out: Path, seed: int) -> list[bytes]:
        generate(SynthConfig(out=out, dialogues=3, seed=seed, faults=True, use_bank=True, workers=2))
        return [(out / name).read_bytes() for name in CSV_NAMES.values()]

    first, again, other = make(tmp_path / "a", 1), make(tmp_path / "b", 1), make(tmp_path / "c", 2)
    assert first == again
    assert first != other


def test_header_is_the_real_meld_header(meld_text_dir):
    for name in CSV_NAMES.values():
        assert next(csv.reader((meld_text_dir / name).open(encoding="utf-8"))) == MELD_HEADER


def test_real_meld_text_source_keeps_ids_and_labels(meld_text_dir):
    counts = dialogues_per_split(10, SynthConfig().split_fractions)
    lines = script_from_meld_text(meld_text_dir, counts, seed=3)
    assert lines == script_from_meld_text(meld_text_dir, counts, seed=3)
    real = {r.key: r for reading in read_splits(meld_text_dir).values() for r in reading.records}
    for line in lines:
        assert (line.text, line.speaker, line.emotion) == (real[line.key].text, real[line.key].speaker, real[line.key].emotion)
    by_split = Counter(line.split for line in lines)
    dialogues = {s: len({l.dialogue_id for l in lines if l.split == s}) for s in by_split}
    assert dialogues == counts
    # whole dialogues: every utterance of a chosen dialogue is there
    for line in lines:
        siblings = [k for k in real if k.startswith(f"{line.split}/dia{line.dialogue_id}_")]
        assert all(k in {l.key for l in lines} for k in siblings)


def test_bank_labels_follow_meld_distribution():
    lines = script_from_bank({"train": 300, "dev": 30, "test": 70}, seed=0)
    share = Counter(l.emotion for l in lines)
    assert share["neutral"] / len(lines) == pytest.approx(0.47, abs=0.05)
    assert set(share) == set(EMOTIONS)


@pytest.mark.parametrize("total", [3, 12, 40, 1432])
def test_dialogues_per_split_sums_and_covers_every_split(total):
    counts = dialogues_per_split(total, SynthConfig().split_fractions)
    assert sum(counts.values()) == total and min(counts.values()) >= 1


@pytest.mark.slow
def test_shot_reverse_shot_clip_has_one_cut_the_stage_finds_and_no_track_crosses(tmp_path):
    """A two-face clip rendered with a cut: the camera turns (another backdrop, the faces swap sides);
    `ground_truth` records the cut, the shot detector finds it, tracks stay within shots and the
    speaker's box is right on both sides of the cut."""
    from pipelines.asd.stage import ASD_FPS, speaker_for_clip
    from pipelines.decode import read_audio_16k
    from pipelines.meld import Utterance
    from pipelines.synth.clip import ClipJob, render_clip
    from tests.conftest import _needs_media_tools

    _needs_media_tools()
    line = Utterance("train", 0, 0, "Monica", "Okay, so what you are telling me is that we have to go back there now.",
                     "neutral", "neutral", None, None, "", "", None, "found")  # fmt: skip
    path = tmp_path / "dia0_utt0.mp4"
    truth = render_clip(ClipJob(line, path, seed=3, min_duration=3.0, two_face_prob=1.0, cut_prob=1.0))
    assert len(truth["cuts"]) == 1 and len(truth["faces"]) == 2
    cut = truth["cuts"][0]
    speaker = truth["faces"][truth["speaker_face"]]["boxes"]
    assert (speaker[cut - 1][0] < truth["width"] / 2) != (speaker[cut][0] < truth["width"] / 2)  # sides swap

    result, clip = speaker_for_clip(str(path), read_audio_16k(path))
    cut_25 = round(cut / truth["fps"] * ASD_FPS)
    assert [abs(c - cut_25) <= 1 for c in clip.cuts] == [True]
    for t in [result.track, *result.other_shots]:
        assert not (t.frames[0] < cut_25 - 1 and t.frames[-1] > cut_25 + 1)
    for frame_25 in (cut_25 // 2, (cut_25 + len(clip.small)) // 2):
        box = result.box_at(frame_25 / ASD_FPS)
        x0, y0, x1, y1 = speaker[min(round(frame_25 / ASD_FPS * truth["fps"]), truth["n_frames"] - 1)]
        assert x0 <= (box[0] + box[2]) / 2 <= x1 and y0 <= (box[1] + box[3]) / 2 <= y1
