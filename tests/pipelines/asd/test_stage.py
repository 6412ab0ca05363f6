"""The speaker stage's steps, as the job's Ray stages run them: several clips per model call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.asd.stage import ClipFrames, SpeakerWork, s3fd_faces, score_with_talknet, track_speaker
from pipelines.asd.tracking import Track


def _work(n_frames: int, tracks: int, seed: int) -> SpeakerWork:
    rng = np.random.default_rng(seed)
    clip = ClipFrames(np.zeros((n_frames, 8, 8, 3), np.uint8), 1.0, [])
    work = SpeakerWork(clip, rng.normal(size=n_frames * 640).astype(np.float32))
    boxes = np.tile([10.0, 10.0, 50.0, 50.0], (n_frames, 1))
    work.tracks = [Track(np.arange(n_frames), boxes) for _ in range(tracks)]
    work.talknet_inputs = [
        (rng.normal(size=(4 * n_frames - 4, 13)).astype(np.float32), rng.integers(0, 255, (n_frames - 1, 112, 112), dtype=np.uint8))
        for _ in range(tracks)
    ]  # fmt: skip
    return work


def test_talknet_scores_batched_across_clips_equal_clip_by_clip():
    """A TalkNet actor scores the tracks of a batch of clips together: each clip's speaker and score are
    what scoring it alone gives (windows of equal length are stacked across clips)."""
    from pipelines.asd.talknet import TalkNet

    torch.manual_seed(0)
    model = TalkNet().eval()
    shapes = [(26, 2), (12, 1)]  # frames, tracks
    together = [_work(n, k, seed) for seed, (n, k) in enumerate(shapes)]
    alone = [_work(n, k, seed) for seed, (n, k) in enumerate(shapes)]
    score_with_talknet(together, model)
    for work in alone:
        score_with_talknet([work], model)
    for a, b in zip(together, alone):
        assert a.result.method == "talknet" and a.talknet_inputs is None
        assert a.result.score == pytest.approx(b.result.score, abs=1e-6)
        assert [t is a.result.track for t in a.tracks] == [t is b.result.track for t in b.tracks]


def test_a_clip_decided_before_scoring_is_left_as_it_is():
    from pipelines.asd.talknet import TalkNet

    decided = _work(12, 1, 0)
    track_speaker(decided_none := SpeakerWork(ClipFrames(np.zeros((30, 64, 64, 3), np.uint8), 1.0, []), None), talknet=True)
    assert decided_none.result.method == "none" and decided_none.talknet_inputs is None  # no face: decided
    score_with_talknet([decided_none, decided], TalkNet().eval())
    assert decided_none.result.method == "none" and decided.result.method == "talknet"


def test_s3fd_frames_of_several_clips_and_sizes_equal_frame_by_frame():
    """An S3FD actor batches frames across clips (grouped by size): each frame gets the boxes it gets alone."""
    from pipelines.asd.s3fd import S3FD, detect

    torch.manual_seed(0)
    model = S3FD().eval()
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (3, 64, 96, 3), dtype=np.uint8), rng.integers(0, 255, (2, 48, 64, 3), dtype=np.uint8)]
    batched = s3fd_faces(model, clips, frames_per_forward=4)
    for frames, found in zip(clips, batched):
        assert len(found) == len(frames)
        for frame, boxes in zip(frames, found):
            np.testing.assert_allclose(boxes, detect(model, frame, scale=1.0), atol=1e-3)


def _two_faces(n: int, swap_at: int | None, swap_both: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
    frames = np.full((n, 120, 240, 3), 110, np.uint8)
    left, right = (90, 60, 40), (225, 190, 160)  # a darker and a lighter face
    boxes = np.array([[20.0, 20.0, 100.0, 100.0], [140.0, 20.0, 220.0, 100.0]])
    for i in range(n):
        swapped = swap_at is not None and i >= swap_at
        frames[i, 20:100, 20:100] = right if swapped else left
        frames[i, 20:100, 140:220] = left if swapped and swap_both else right
    detections = [boxes.copy() if i % 5 == 0 or i == n - 1 else np.zeros((0, 4)) for i in range(n)]
    return frames, detections


def test_a_reverse_shot_over_a_similar_backdrop_is_cut_where_the_faces_change():
    """Two people swap sides at frame 17 and the backdrop barely changes (a content detector sees no cut):
    every face at the same place looks like another person, so the shot is cut there and tracks stop."""
    from pipelines.asd.stage import look_cuts, tracks_from

    frames, detections = _two_faces(30, swap_at=17)
    assert look_cuts(frames, detections, []) == [17]
    assert look_cuts(frames, detections, [16]) == [16]  # a cut already found in that gap is kept as it is
    assert all(t.frames[-1] < 17 or t.frames[0] >= 17 for t in tracks_from(detections, False, [17]))
    still, detections = _two_faces(30, swap_at=None)
    assert look_cuts(still, detections, []) == []


def test_one_face_changing_alone_is_no_cut():
    """Only one of the faces changes (someone turns, a hand covers a face): no cut."""
    from pipelines.asd.stage import look_cuts

    frames, detections = _two_faces(30, swap_at=17, swap_both=False)
    assert look_cuts(frames, detections, []) == []


def _frame_label(image: np.ndarray) -> int:
    """The frame number a labelled test frame shows: N mod 16 on its left half, N // 16 on its right, as
    grey levels 16 apart (they survive the demo's MPEG-4 and JPEG at q 2)."""
    grey = image.astype(float).mean(-1)
    low, high = grey[8:40, 4:28].mean(), grey[8:40, 36:60].mean()
    return int(round((low - 8) / 16)) + 16 * int(round((high - 8) / 16))


@pytest.mark.parametrize(
    "rate, audio_rate",
    [("24000/1001", 48_000), ("30", 48_000), ("30000/1001", 16_000), ("25", None)],
)
def test_faithful_frames_are_the_ones_the_demos_ffmpeg_picks(tmp_path, rate, audio_rate):
    """demoTalkNet.py (TaoRuijie/TalkNet-ASD 6d68214) l.395 `ffmpeg -i clip ... -r 25 video.avi` and l.411
    (its frames to jpgs): FFmpeg converts the rate into an AVI the `vfr` way, the AVI's MP3 (starting
    1105 samples early) delays every frame after the first by ceil(1105 x 25 / rate) frames, and the jpgs
    fill the empty slots `cfr`. Faithful mode reads the same source frames: lossless clips whose frames
    show their numbers, at 23.976 and 30 fps with 48 kHz audio (the demo's frames are not the nearest in
    time: 60 of 66 and 63 of 65 differ), 29.97 fps with 16 kHz audio (2 frames late), 25 fps without audio."""
    import cv2

    from pipelines.asd.stage import iter_full_frames
    from tests.pipelines.test_decode import _ffmpeg, run_demo_extraction

    clip = tmp_path / "numbered.mp4"
    label = "if(lt(X,32),mod(N,16)*16+8,floor(N/16)*16+8)"
    numbered = f"color=c=black:s=64x48:r={rate}:d=2.6,format=gray,geq=lum='{label}'"
    sine = f"sine=frequency=300:duration=2.6:sample_rate={audio_rate}"
    audio = ["-f", "lavfi", "-i", sine, "-c:a", "aac"] if audio_rate else []
    _ffmpeg("-f", "lavfi", "-i", numbered, *audio, "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p", str(clip))
    jpgs, _ = run_demo_extraction(clip, tmp_path / "demo", audio=audio_rate is not None)
    demo = [_frame_label(cv2.imread(str(path))) for path in jpgs]
    ours = [_frame_label(frame) for _, chunk in iter_full_frames(str(clip), chunk=16) for frame in chunk]
    assert ours == demo
    assert len(set(demo)) > 0.9 * len(demo)  # the labels read back: mostly distinct frames
