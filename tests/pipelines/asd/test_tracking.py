from __future__ import annotations

import numpy as np
import pytest

from pipelines.asd.tracking import build_tracks, iou, link_detections, link_like_demo


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


def test_faithful_linking_gives_a_contested_box_to_the_track_started_first():
    """demoTalkNet.py `track_shot` l.133-147 (TaoRuijie/TalkNet-ASD 6d68214): the demo builds one track at
    a time, so a box that fits two open tracks goes to the one started first. Face A (frames 0-5) is
    missed from frame 6; face B appears beside it at frame 6 (IoU 1/3 with A) and is missed from frame
    15, where one box overlaps both A's and B's last box by 0.6: the demo gives it (and the face's next
    frames) to A; merg's own linking to B, the longer track."""
    a, b, between = _box(100, 100), _box(120, 100), _box(110, 100)
    detections = [np.array([a])] * 6 + [np.array([b])] * 9 + [np.array([between])] * 10
    demo = [[f for f, _ in t] for t in link_like_demo(detections)]
    assert demo == [[*range(6), *range(15, 25)], list(range(6, 15))]
    merg = [[f for f, _ in t] for t in link_detections(detections)]
    assert merg == [list(range(6)), list(range(6, 25))]
    tracks = build_tracks(detections, min_length=10, min_detections=10, like_demo=True)
    assert [(t.frames[0], t.frames[-1]) for t in tracks] == [(0, 24)]  # B's 9 detections are too few
    np.testing.assert_allclose(tracks[0].raw_boxes[10], _box(105, 100))  # halfway through A's gap


def _iou_as_the_demo(a, b) -> float:  # demoTalkNet.py l.114-127, evalCol off
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _demo_tracks(detections, min_track=10, max_missed=10, threshold=0.5):
    """demoTalkNet.py `track_shot` l.129-161, restated: tracks built one by one from face dicts, each taken
    face removed from its frame's list while that list is being walked (so the face after it is skipped
    by this track), kept with more than `min_track` faces, boxes `interp1d` over the frames they span."""
    from scipy.interpolate import interp1d

    frames = [[{"frame": f, "bbox": [float(v) for v in box]} for box in boxes] for f, boxes in enumerate(detections)]
    kept = []
    while True:
        chain = []
        for faces in frames:
            for face in faces:
                if not chain:
                    chain.append(face)
                    faces.remove(face)
                elif face["frame"] - chain[-1]["frame"] > max_missed:
                    break
                elif _iou_as_the_demo(face["bbox"], chain[-1]["bbox"]) > threshold:
                    chain.append(face)
                    faces.remove(face)
        if not chain:
            return kept
        if len(chain) > min_track:
            numbers = np.array([face["frame"] for face in chain])
            boxes = np.array([face["bbox"] for face in chain])
            span = np.arange(numbers[0], numbers[-1] + 1)
            kept.append((span, np.stack([interp1d(numbers, boxes[:, i])(span) for i in range(4)], axis=1)))


def _random_scene(rng, nms: bool, frames: int = 60) -> list[np.ndarray]:
    """2-3 faces crossing on straight lines, 2 px jitter, 15% missed detections, boxes in random order
    (`nms`: by a random confidence, each box dropped that overlaps a more confident one by > 0.3, as S3FD)."""
    n = int(rng.integers(2, 4))
    start, end = rng.uniform(60, 260, (n, 2)), rng.uniform(60, 260, (n, 2))
    size = rng.uniform(40, 70, n)
    out = []
    for t in range(frames):
        centre = start + (end - start) * t / (frames - 1) + rng.normal(0, 2, (n, 2))
        boxes = [_box(*centre[i], size[i]) for i in range(n) if rng.random() > 0.15]
        order = rng.permutation(len(boxes))
        boxes = [boxes[i] for i in order]
        if nms:
            kept = []
            for box in boxes:  # already in (random) confidence order
                if all(iou(box, other) <= 0.3 for other in kept):
                    kept.append(box)
            boxes = kept
        out.append(np.array(boxes).reshape(-1, 4))
    return out


@pytest.mark.parametrize("nms", [True, False])
def test_faithful_tracks_are_the_demos_on_random_crossing_faces(nms):
    """demoTalkNet.py `track_shot` l.129-161: 150 random scenes of crossing faces with missed detections,
    with and without S3FD's NMS (without it, a frame can hold two boxes that both fit a track, and the
    demo's removal while walking a list shows). Faithful tracks are the demo's, in its order, to float
    tolerance; merg's own linking (the best overlap, longest track first) is not, in some scenes."""
    rng = np.random.default_rng(26)
    differs = 0
    for _ in range(150):
        detections = _random_scene(rng, nms)
        expected = _demo_tracks([d.copy() for d in detections])
        tracks = build_tracks(detections, min_length=10, min_detections=10, like_demo=True)
        assert [t.frames.tolist() for t in tracks] == [span.tolist() for span, _ in expected]
        for track, (_, boxes) in zip(tracks, expected):
            np.testing.assert_allclose(track.raw_boxes, boxes, rtol=0, atol=1e-9)
        own = build_tracks(detections, min_length=10, min_detections=10)
        differs += [t.frames.tolist() for t in own] != [t.frames.tolist() for t in tracks] or any(
            not np.allclose(a.raw_boxes, b.raw_boxes) for a, b in zip(own, tracks)
        )
    assert differs > 0
