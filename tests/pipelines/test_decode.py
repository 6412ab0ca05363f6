from __future__ import annotations

import numpy as np
import pytest

from pipelines.decode import decode_clip, read_audio_16k
from pipelines.media import crop_square
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


def test_the_speaking_face_is_found_and_cropped(mini_meld):
    """The speaker stage finds the face that speaks (the sidecar knows which) and crops it."""
    truths = [t for t in read_ground_truth(mini_meld).values() if t["fault"] is None]
    hits = 0
    for truth in truths:
        clip = decode_clip(truth["key"], mini_meld / truth["clip"])
        assert clip.asd_method == "sync" and clip.frames.shape == (5, 2, 224, 224, 3)
        if not clip.face_visible:
            continue
        x0, y0, x1, y1 = clip.speaker_box
        cx, cy = (x0 + x1) / 2 * truth["width"], (y0 + y1) / 2 * truth["height"]
        box = truth["faces"][truth["speaker_face"]]["boxes"][truth["n_frames"] // 2]
        hits += box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
    assert hits >= 0.9 * len(truths), (hits, len(truths))


def test_no_face_means_no_visible_speaker_and_a_centre_crop(tmp_path):
    """A clip with speech but no face: kept, flagged, the centre of the frame embedded."""
    import subprocess

    path = tmp_path / "blank.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=gray:s=320x240:d=2:r=25",
                    "-f", "lavfi", "-i", "sine=frequency=300:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", str(path)], check=True)  # fmt: skip
    clip = decode_clip("test/dia0_utt0", path)
    assert clip.failure is None and clip.face_visible is False and clip.asd_method == "none"
    assert clip.frames.shape == (5, 2, 224, 224, 3) and clip.audio is not None


def test_an_audio_only_clip_keeps_its_audio_embedding(tmp_path):
    """issue 27 item 3: a clip with an audio stream and no video stream is recorded `no_video_stream`
    and its voice is still embedded (as a clip without audio keeps its face)."""
    import subprocess

    from pipelines.job import ImageBindStage, clip_row, fuse_batch

    path = tmp_path / "voice.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=300:duration=2",
                    "-c:a", "aac", "-vn", str(path)], check=True)  # fmt: skip
    clip = decode_clip("test/dia0_utt0", path)
    assert clip.audio is not None and clip.frames is None and clip.has_audio and clip.duration == pytest.approx(2, abs=0.1)
    assert clip.failure == ("decode", "no_video_stream", "audio only; no frames")
    row = clip_row(clip)
    batch = {k: np.array([v], dtype=object if isinstance(v, str) else None) for k, v in row.items()}
    fused = fuse_batch(ImageBindStage(checkpoint=None, size=None, seed=0)(batch), "mean_l2")
    assert fused["audio_emb"][0].any() and not fused["vision_emb"][0].any() and np.isfinite(fused["fused_emb"][0]).all()
    assert fused["has_audio_feat"][0] and not fused["has_frames"][0]


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
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 150:] = 255
    crop = crop_square(frame, np.array([180, 80, 210, 110]), margin=1.4)
    assert crop.shape == (224, 224, 3)
    assert crop.mean() > 0  # shifted left to stay inside, still on the face's (white) side


def test_save_crops_writes_the_speaker_track(mini_meld, tmp_path):
    import decord

    from pipelines.decode import SpeakerSettings

    truth = next(t for t in read_ground_truth(mini_meld).values() if t["fault"] is None and len(t["faces"]) == 2)
    clip = decode_clip(truth["key"], mini_meld / truth["clip"], speaker=SpeakerSettings(save_crops=str(tmp_path)))
    video = decord.VideoReader(str(tmp_path / f"{truth['key']}.mp4"))
    assert video[0].shape == (224, 224, 3) and len(video) == clip.speaker_track_frames


def test_a_clip_that_fails_a_model_batch_is_retried_alone_and_only_it_fails(monkeypatch):
    """An actor's batch (S3FD or TalkNet over several clips) that raises is retried clip by clip: the bad
    clip is recorded with a reason and goes on to a centre crop; the others are scored."""
    import pipelines.decode as decode
    from pipelines.asd.stage import ClipFrames, SpeakerWork

    def score(works):
        if any(w.clip.path == "bad.mp4" for w in works):
            raise RuntimeError("CUDA error: an illegal memory access")
        for w in works:
            w.result = "scored"

    monkeypatch.setattr(decode, "score_with_talknet", lambda works, model: score(works))
    clips = [decode.DecodedClip(key=f"dev/dia0_utt{i}", path=p) for i, p in enumerate(["a.mp4", "bad.mp4", "b.mp4"])]
    for clip in clips:
        clip.speaker = SpeakerWork(ClipFrames(np.zeros((1, 2, 2, 3), np.uint8), 1.0, [], path=clip.path), None)
    decode.score_step(clips, None)
    assert [c.speaker.result if c.speaker else None for c in clips] == ["scored", None, "scored"]
    assert clips[1].failure[:2] == ("speaker", "speaker_scoring_error") and "illegal memory" in clips[1].failure[2]
    assert clips[0].failure is None and clips[2].failure is None


def test_a_decode_task_that_hands_its_frames_on_requests_more_memory():
    """With an S3FD stage after it a decode task's output is the clip's frames (serialised): its request
    grows with them; without one it keeps only the tracks and requests what decoding alone needs."""
    from pipelines.decode import decode_memory

    assert decode_memory(1920, 1080, 20, 25) == 4.5 * 1024**3
    assert decode_memory(1920, 1080, 20, 25, frames_out=True) > decode_memory(1920, 1080, 20, 25)
    # faithful mode also hands on S3FD's 0.25-scale input; fast mode's is made in the S3FD actor
    assert decode_memory(1920, 1080, 20, 25, True, s3fd_input=True) > decode_memory(1920, 1080, 20, 25, True)
