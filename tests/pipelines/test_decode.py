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


def _ffmpeg(*args: str) -> None:
    import subprocess

    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", *args], check=True)


def run_demo_extraction(clip, folder, audio: bool = True) -> tuple:
    """The TalkNet demo's own commands (TaoRuijie/TalkNet-ASD 6d68214, demoTalkNet.py l.395, l.405,
    l.411): the clip to a 25-fps AVI (MPEG-4 video, MP3 audio), its audio to a 16 kHz mono wav, its
    frames to jpgs. Returns (jpg paths in order, wav path or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    avi, wav = folder / "video.avi", folder / "audio.wav"
    _ffmpeg("-i", str(clip), "-qscale:v", "2", "-threads", "1", "-async", "1", "-r", "25", str(avi))
    if audio:
        _ffmpeg("-i", str(avi), "-qscale:a", "0", "-ac", "1", "-vn", "-threads", "1", "-ar", "16000", str(wav))
    _ffmpeg("-i", str(avi), "-qscale:v", "2", "-threads", "1", "-f", "image2", str(folder / "%06d.jpg"))
    return sorted(folder.glob("*.jpg")), wav if audio else None


def test_talknet_audio_is_ffmpegs_s16_mono_downmix(tmp_path):
    """demoTalkNet.py l.405 (`ffmpeg ... -ac 1 ... -ar 16000 audio.wav`: pcm_s16le) and l.202/l.218
    (`wavfile.read`): TalkNet hears FFmpeg's downmix to int16, which FFmpeg's resampler normalises (0.5 L +
    0.5 R); to float it does not (0.707 L + 0.707 R: MFCC c0 + ln 2). A stereo AAC clip whose channels
    differ, and a mono one, against `ffmpeg -ac 1 -ar 16000 -f s16le`: within 1 sample."""
    stereo, mono = tmp_path / "stereo.mp4", tmp_path / "mono.mp4"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=2:sample_rate=48000", "-f", "lavfi", "-i",
            "anoisesrc=d=2:r=48000:a=0.2:seed=1", "-filter_complex", "[0][1]amerge=inputs=2", "-c:a", "aac", str(stereo))  # fmt: skip
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2:sample_rate=44100", "-c:a", "aac", str(mono))
    for path in (stereo, mono):
        _ffmpeg("-i", str(path), "-ac", "1", "-ar", "16000", "-f", "s16le", str(path.with_suffix(".raw")))
        expected = np.fromfile(path.with_suffix(".raw"), np.int16).astype(np.int64)
        ours = read_audio_16k(path) * 32768
        assert len(ours) == len(expected) and ours.dtype == np.float32
        assert np.abs(ours - expected).max() <= 1, path.name


@pytest.mark.parametrize("audio_offset", [0.0, 0.2])
def test_faithful_audio_starts_as_late_as_the_demos(tmp_path, audio_offset):
    """demoTalkNet.py l.395 then l.405: the demo's audio.wav comes out of the MP3 in its AVI, which starts
    with libmp3lame's encoder delay plus FFmpeg's padding (1105 samples at the clip's rate, 368 at 16 kHz
    for a 48 kHz clip) of silence, after the silence `-async 1` puts where the audio stream starts late
    (here 0.178 s: the AAC frame at 0.2 s). Faithful mode's audio starts with them: lined up with the
    demo's to the sample (cross-correlation), the rest being the MP3's coding."""
    from scipy.io import wavfile
    from scipy.signal import correlate

    video, audio, clip = tmp_path / "video.mp4", tmp_path / "audio.m4a", tmp_path / "noise.mp4"
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x48:r=24000/1001:d=3", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(video))  # fmt: skip
    _ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=3:r=48000:a=0.3:seed=2,lowpass=3000", "-c:a", "aac", "-ac", "2", str(audio))
    _ffmpeg("-i", str(video), "-itsoffset", str(audio_offset), "-i", str(audio), "-map", "0:v", "-map", "1:a", "-c", "copy",
            str(clip))  # fmt: skip
    _, wav = run_demo_extraction(clip, tmp_path / "demo")
    demo = wavfile.read(wav)[1].astype(np.float64)
    late = {0.0: 0, 0.2: 2_848}[audio_offset]
    for delayed, lag_expected in ((True, 0), (False, 368 + late)):
        ours = read_audio_16k(clip, demo_delay=delayed).astype(np.float64)
        n = min(len(ours), len(demo))
        lag = int(np.argmax(correlate(demo[:n], ours[:n], method="fft"))) - (n - 1)
        assert lag == lag_expected, delayed
    ours = read_audio_16k(clip, demo_delay=True)[:n] * 32768
    lead = 368 + late
    assert np.abs(ours[: lead - 20]).max() == 0 and np.corrcoef(ours[lead + 40 :], demo[lead + 40 : n])[0, 1] > 0.98
