from __future__ import annotations

import numpy as np
import pytest

from pipelines.asd.tracking import build_tracks, iou


def _box(cx, cy, size=40.0):
    return np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])


def test_iou():
    assert iou(_box(0, 0), _box(0, 0)) == pytest.approx(1.0)
    assert iou(_box(0, 0), _box(100, 0)) == 0.0
    assert iou(_box(0, 0, 40), _box(20, 0, 40)) == pytest.approx(1 / 3)


def test_one_moving_face_with_gaps_is_one_interpolated_track():
    frames = 60
    detections = [np.array([_box(100 + t, 100)]) for t in range(frames)]  # slow enough to overlap across gaps
    for gap in list(range(10, 18)) + list(range(30, 33)):  # 8 and 3 missed frames
        detections[gap] = np.zeros((0, 4))
    (track,) = build_tracks(detections)
    assert track.frames.tolist() == list(range(frames))
    np.testing.assert_allclose(track.boxes[14], _box(114, 100), atol=1e-6)  # interpolated over the gap


def test_a_gap_longer_than_tolerated_splits_the_track():
    detections = [np.array([_box(100, 100)]) for _ in range(50)]
    for gap in range(20, 32):  # 12 frames, more than the 10 tolerated
        detections[gap] = np.zeros((0, 4))
    tracks = build_tracks(detections)
    assert [(t.frames[0], t.frames[-1]) for t in tracks] == [(0, 19), (32, 49)]


def test_short_tracks_and_spurious_detections_are_dropped():
    detections = [np.array([_box(100, 100)]) for _ in range(30)]
    detections[5] = np.array([_box(100, 100), _box(400, 300)])  # a one-frame false positive
    tracks = build_tracks(detections)
    assert len(tracks) == 1 and len(tracks[0]) == 30


def test_two_faces_crossing_keep_their_identities():
    """Two faces pass each other (one slightly higher): each track stays on its own face."""
    frames = 80
    left = [_box(100 + 4 * t, 100) for t in range(frames)]  # moves right
    right = [_box(420 - 4 * t, 120) for t in range(frames)]  # moves left, 20 px lower
    rng = np.random.default_rng(0)
    detections = []
    for t in range(frames):
        boxes = [left[t], right[t]]
        rng.shuffle(boxes)  # detector order means nothing
        detections.append(np.array(boxes))
    tracks = build_tracks(detections, smooth_kernel=1)
    assert len(tracks) == 2 and all(len(t) == frames for t in tracks)
    by_start = sorted(tracks, key=lambda t: t.boxes[0, 0])
    np.testing.assert_allclose(by_start[0].boxes, np.array(left), atol=1e-6)
    np.testing.assert_allclose(by_start[1].boxes, np.array(right), atol=1e-6)


def test_median_smoothing_removes_a_jittery_box():
    detections = [np.array([_box(100, 100)]) for _ in range(30)]
    detections[15] = np.array([_box(108, 100)])  # one jittered detection, still IoU > 0.5
    (track,) = build_tracks(detections)
    np.testing.assert_allclose(track.boxes[15], _box(100, 100), atol=1e-6)


def test_every_kth_frame_detection():
    detections = [np.array([_box(100 + t, 100)]) if t % 5 == 0 else np.zeros((0, 4)) for t in range(41)]
    (track,) = build_tracks(detections)
    assert track.frames.tolist() == list(range(41))
    np.testing.assert_allclose(track.boxes[:, 0], 80 + np.arange(41), atol=1e-6)


def _still_face(frames: range, box=(100.0, 100.0, 160.0, 160.0), n: int = 60) -> list[np.ndarray]:
    return [np.array([box]) if i in frames else np.zeros((0, 4)) for i in range(n)]


def test_a_track_needs_more_than_min_track_detections_as_the_demo():
    """TaoRuijie/TalkNet-ASD demoTalkNet.py `track_shot` ~l.150: `len(track) > args.minTrack` (10): a track
    of 10 detected frames is dropped, one of 11 kept, however long it spans."""
    ten, eleven = _still_face(range(0, 20, 2)), _still_face(range(0, 22, 2))
    assert build_tracks(ten, min_detections=10) == []
    assert [len(t) for t in build_tracks(eleven, min_detections=10)] == [21]


def test_tracks_never_cross_a_shot_cut():
    """demoTalkNet.py ~l.426-428: tracks are built shot by shot (`track_shot(faces[shot[0]:shot[1]])`),
    and a shot shorter than minTrack frames is skipped."""
    detections = _still_face(range(60))
    tracks = build_tracks(detections, cuts=[25, 55])
    assert [(t.frames[0], t.frames[-1]) for t in tracks] == [(0, 24), (25, 54)]  # the 5-frame shot is skipped
    assert all(t.raw_boxes is not None and t.raw_boxes.shape == t.boxes.shape for t in tracks)
