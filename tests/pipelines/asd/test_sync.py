from __future__ import annotations

import decord
import numpy as np

from pipelines.asd.sync import DEFAULT_THRESHOLD, mouth_motion, sync_score
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
        scores = [sync_score(mouth_motion(frames, np.array(face["boxes"][: len(frames)])), envelope) for face in t["faces"]]
        right += int(np.argmax(scores)) == t["speaker_face"]
        speaking_scores.append(scores[t["speaker_face"]])
        silent_scores.append(scores[1 - t["speaker_face"]])
    assert right / len(truths) >= 0.95, (right, len(truths))
    assert np.mean(np.array(speaking_scores) > DEFAULT_THRESHOLD) >= 0.9
    assert np.mean(np.array(silent_scores) < DEFAULT_THRESHOLD) >= 0.8  # 89% on 76 demo clips


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
