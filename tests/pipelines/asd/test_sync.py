from __future__ import annotations

import decord
import numpy as np

from pipelines.asd.sync import (
    DEFAULT_THRESHOLD, detrend, leave_one_out_medians, mouth_crops, mouth_opening, sync_score, track_sync_score,
)  # fmt: skip
from pipelines.decode import read_audio_16k
from pipelines.media import rms_per_frame
from pipelines.synth import read_ground_truth


def test_scores_are_zero_for_a_still_mouth_or_silence():
    rng = np.random.default_rng(0)
    envelope = rng.random(50).astype(np.float32)
    assert sync_score(np.zeros(50, np.float32), envelope) == 0.0
    assert sync_score(rng.random(50).astype(np.float32), np.zeros(50, np.float32)) == 0.0
    assert sync_score(envelope.copy(), envelope) > 0.99
    shifted = np.roll(envelope, 2)
    assert sync_score(shifted, envelope, max_lag=2) > 0.9  # lips may lag the sound


def _speech_envelope(n: int = 75, fps: float = 25.0) -> np.ndarray:
    """Silence, 2 s of syllables (4.5 a second), silence: the shape of a clip's loudness."""
    t = np.arange(n) / fps
    return np.where((t > 0.5) & (t < 2.5), 0.55 + 0.45 * np.sin(2 * np.pi * 4.5 * t), 0.0).astype(np.float32)


def test_opening_is_the_distance_from_the_mouth_at_rest():
    """The rest look is the median crop of the quietest quarter of the frames; a crop's opening is
    its mean absolute difference from it."""
    envelope = _speech_envelope()
    crops = np.full((len(envelope), 16, 32), 120.0, np.float32)
    crops[:, 8:12, 8:24] -= 100 * envelope[:, None, None]  # a dark opening as wide as the speech is loud
    opening = mouth_opening(crops, envelope)
    np.testing.assert_allclose(opening, 100 * envelope * (4 * 16) / (16 * 32), rtol=1e-5, atol=1e-5)
    assert sync_score(opening, envelope) > 0.99


def test_a_still_face_with_pixel_noise_does_not_follow_the_speech():
    """Compression noise on a still face: measured against a rest look built from the quiet frames
    themselves, the quiet frames would be nearest rest and 9 in 10 one-second tracks would pass the
    threshold; against the other quiet frames' median the noise says nothing."""
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(100):
        envelope = np.convolve((rng.random(25) < 0.6) * rng.uniform(0.3, 1.0, 25), np.ones(3) / 3, mode="same")
        crops = np.round(120 + rng.normal(0, 2, (25, 16, 32))).astype(np.float32)
        scores.append(sync_score(mouth_opening(crops, envelope), envelope))
    assert np.mean(np.array(scores) >= DEFAULT_THRESHOLD) < 0.1


def test_a_drifting_head_with_a_still_mouth_does_not_follow_the_speech():
    """A listener whose head moves while the speech starts and stops: its mouth crop changes with the
    speech's on and off, not with its syllables. Detrending keeps the score under the threshold; the
    raw correlation would pass it."""
    envelope = _speech_envelope()
    frames = np.zeros((len(envelope), 120, 160, 3), np.uint8)
    drift = np.where(envelope > 0, 6, 0)  # the head sits 6 px lower while the other one speaks
    for i, dy in enumerate(drift):
        frames[i, 40 + dy : 100 + dy, 50:110] = 200  # face
        frames[i, 85 + dy : 88 + dy, 70:90] = 60  # a closed mouth
    boxes = np.tile([50.0, 40.0, 110.0, 100.0], (len(frames), 1))  # a box that lags the drift
    opening = mouth_opening(mouth_crops(frames, boxes), envelope)
    assert np.corrcoef(opening, envelope)[0, 1] > 0.5
    assert track_sync_score(frames, boxes, envelope) < DEFAULT_THRESHOLD


def test_leave_one_out_medians_equal_numpy_medians_without_each_row():
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 5, 10, 11):
        for x in (rng.random((n, 4, 3)).astype(np.float32), np.round(rng.random((n, 4, 3)) * 3)):  # ties too
            expected = np.stack([np.median(np.delete(x, i, axis=0), axis=0) for i in range(n)])
            np.testing.assert_allclose(leave_one_out_medians(x), expected, atol=1e-6)


def test_detrend_removes_the_moving_mean():
    assert np.allclose(detrend(np.full(20, 3.0)), 0.0)
    ramp = np.arange(30, dtype=float)
    assert np.allclose(detrend(ramp)[5:-5], 0.0)  # a straight line is its own moving mean


def test_sync_picks_the_speaking_face_on_generated_clips(mini_meld):
    """With the sidecar's face boxes, `sync` must find the speaker of every two-face clip."""
    truths = [t for t in read_ground_truth(mini_meld).values() if t["fault"] is None and len(t["faces"]) == 2]
    assert truths, "the fixture should contain two-face clips"
    right, speaking_scores, silent_scores = 0, [], []
    for t in truths:
        path = str(mini_meld / t["clip"])
        reader = decord.VideoReader(path)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        envelope = rms_per_frame(read_audio_16k(path), 16_000, reader.get_avg_fps(), len(frames))
        scores = [track_sync_score(frames, np.array(face["boxes"][: len(frames)]), envelope) for face in t["faces"]]
        right += int(np.argmax(scores)) == t["speaker_face"]
        speaking_scores.append(scores[t["speaker_face"]])
        silent_scores.append(scores[1 - t["speaker_face"]])
    assert right / len(truths) >= 0.95, (right, len(truths))
    assert np.mean(np.array(speaking_scores) > DEFAULT_THRESHOLD) >= 0.9
    assert np.mean(np.array(silent_scores) < DEFAULT_THRESHOLD) >= 0.8


def test_asd_show_renders_a_contact_sheet(mini_meld, tmp_path):
    from typer.testing import CliRunner

    from infra.cli import app

    key = next(t["key"] for t in read_ground_truth(mini_meld).values() if t["fault"] is None and len(t["faces"]) == 2)
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(app, ["asd", "show", key, "--meld-root", str(mini_meld), "--out", str(out), "--tiles", "4"])
    assert result.exit_code == 0, result.output
    assert "track(s), method sync" in result.output
    from PIL import Image

    with Image.open(out) as sheet:  # (cv2.imread can hit a zlib clash in a process that loaded torch)
        sheet.load()
        assert sheet.size[0] > sheet.size[1]  # 4 tiles side by side
    missing = CliRunner().invoke(app, ["asd", "show", "train/dia999_utt0", "--meld-root", str(mini_meld)])
    assert missing.exit_code == 2 and "no clip" in missing.output


def test_the_configured_threshold_is_the_scorers():
    from infra.config import PreprocessConfig

    assert PreprocessConfig().asd_threshold == DEFAULT_THRESHOLD
