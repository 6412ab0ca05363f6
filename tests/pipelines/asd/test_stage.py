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
