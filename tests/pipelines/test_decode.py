from __future__ import annotations

import numpy as np
import pytest

from pipelines.decode import crop_square, decode_clip, read_audio_16k
from pipelines.synth import read_ground_truth
from pipelines.synth.faults import EXPECTED


def test_audio_is_16k_mono_with_the_clip_duration(mini_meld):
    truth = next(t for t in read_ground_truth(mini_meld).values() if t["fault"] is None)
    audio = read_audio_16k(mini_meld / truth["clip"])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) / 16_000 == pytest.approx(truth["duration"], abs=0.05)
    start, end = int(truth["speech_start"] * 16_000), int(truth["speech_end"] * 16_000)
    assert np.abs(audio[start:end]).mean() > 5 * np.abs(audio[: max(1, start - 800)]).mean()  # speech, then silence


def test_good_clip_decodes_to_encoder_inputs(mini_meld):
    truth = next(t for t in read_ground_truth(mini_meld).values() if t["fault"] is None)
    clip = decode_clip(truth["key"], mini_meld / truth["clip"])
    assert clip.failure is None and clip.has_audio
    assert clip.audio.shape == (3, 1, 128, 204)
    assert clip.frames.shape == (5, 2, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert clip.duration == pytest.approx(truth["duration"], abs=0.05) and clip.fps == pytest.approx(truth["fps"])


def test_the_largest_face_is_cropped(mini_meld):
    """Until the active-speaker stage: the crop must hold one of the drawn faces."""
    truths = [t for t in read_ground_truth(mini_meld).values() if t["fault"] is None]
    hits = 0
    for truth in truths:
        clip = decode_clip(truth["key"], mini_meld / truth["clip"])
        if not clip.face_visible:
            continue
        x0, y0, x1, y1 = clip.speaker_box
        cx, cy = (x0 + x1) / 2 * truth["width"], (y0 + y1) / 2 * truth["height"]
        boxes = [f["boxes"][len(f["boxes"]) // 2] for f in truth["faces"]]
        hits += any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes)
    assert hits >= 0.7 * len(truths)


def test_every_fault_is_a_reason_never_an_exception(mini_meld):
    for truth in read_ground_truth(mini_meld).values():
        if truth["fault"] is None or EXPECTED[truth["fault"]] == "text_repaired":
            continue
        path = mini_meld / truth["clip"]
        clip = decode_clip(truth["key"], path if path.exists() else None)
        assert clip.failure is not None, truth["fault"]
        expected = "missing_file" if truth["fault"] == "missing_clip" else EXPECTED[truth["fault"]]
        assert clip.failure[1] == expected
        if truth["fault"] == "no_audio":  # the other modality survives
            assert clip.frames is not None and clip.audio is None


def test_crop_square_stays_inside_the_frame():
    frames = np.zeros((1, 100, 200, 3), np.uint8)
    crop, box = crop_square(frames, (180, 80, 30, 30))
    assert crop.shape[1] == crop.shape[2] == 42 and box[2] <= 200 and box[3] <= 100
