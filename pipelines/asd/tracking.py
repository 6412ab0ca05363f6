"""Face tracks from per-frame detections, as TalkNet's demo builds them.

Detections are linked frame to frame by IoU (> 0.5 by default), tolerating up to `max_gap` frames
without a detection (detecting on every k-th frame is fine); tracks shorter than `min_length` frames
are dropped (or, as the demo does, tracks with `min_detections` or fewer detected frames); tracks never
cross a shot boundary (the demo tracks shot by shot); boxes are linearly interpolated over the gaps, then
the box centre and size are median smoothed (edges repeat the nearest value); the interpolated, unsmoothed
boxes are kept too (`raw_boxes`: the demo smooths them its own way when it crops).

Linking: faithful mode (`link_like_demo`) builds one track at a time as the demo does, so a box that fits
two open tracks goes to the one started first. merg's own way (`link_detections`) grows all tracks
together and a track takes the box that overlaps it most, longest tracks choosing first, so two faces
passing close to each other keep their identities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter


@dataclass
class Track:
    frames: np.ndarray  # consecutive frame indices, int [n]
    boxes: np.ndarray  # (x0, y0, x1, y1) per frame, float [n, 4], smoothed
    raw_boxes: np.ndarray | None = None  # the same, interpolated but not smoothed

    def __len__(self) -> int:
        return len(self.frames)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def link_detections(
    detections: list[np.ndarray], iou_threshold: float = 0.5, max_gap: int = 10
) -> list[list[tuple[int, np.ndarray]]]:
    """Greedy linking: each open track takes its best-overlapping detection in the next frame that has any."""
    tracks: list[list[tuple[int, np.ndarray]]] = []
    for frame, boxes in enumerate(detections):
        free = list(np.asarray(boxes, dtype=float).reshape(-1, 4))
        open_tracks = [t for t in tracks if frame - t[-1][0] <= max_gap]
        # longest tracks choose first: they have the most reliable last box
        for track in sorted(open_tracks, key=len, reverse=True):
            if not free:
                break
            overlaps = [iou(track[-1][1], box) for box in free]
            best = int(np.argmax(overlaps))
            if overlaps[best] > iou_threshold:
                track.append((frame, free.pop(best)))
        tracks.extend([(frame, box)] for box in free)
    return tracks


def link_like_demo(
    detections: list[np.ndarray], iou_threshold: float = 0.5, max_gap: int = 10
) -> list[list[tuple[int, np.ndarray]]]:
    """The TalkNet demo's linking (`track_shot`): one track at a time, each from the first box left.

    A track walks the frames in order and takes, frame by frame, every box that overlaps its last one by
    more than `iou_threshold` (its first: the first box left), until `max_gap` frames pass without one.
    Taken boxes are gone for later tracks. As in the demo, whose loop removes a box from the list it is
    walking, the box right after a taken one is not looked at by this track."""
    left = [list(np.asarray(boxes, dtype=float).reshape(-1, 4)) for boxes in detections]
    tracks: list[list[tuple[int, np.ndarray]]] = []
    while True:
        track: list[tuple[int, np.ndarray]] = []
        for frame, boxes in enumerate(left):
            position = 0
            while position < len(boxes):
                if track and frame - track[-1][0] > max_gap:
                    break
                if not track or iou(boxes[position], track[-1][1]) > iou_threshold:
                    track.append((frame, boxes.pop(position)))
                position += 1
        if not track:
            return tracks
        tracks.append(track)


def _smooth(values: np.ndarray, kernel: int) -> np.ndarray:
    # edges repeat the nearest value (scipy.signal.medfilt, as in the demo, pads zeros and drags
    # the first and last boxes towards the origin)
    return median_filter(values, size=kernel, mode="nearest") if kernel >= 3 else values


def build_tracks(
    detections: list[np.ndarray],
    iou_threshold: float = 0.5,
    max_gap: int = 10,
    min_length: int = 10,
    smooth_kernel: int = 13,
    min_detections: int = 0,
    cuts: list[int] | tuple[int, ...] = (),
    like_demo: bool = False,
) -> list[Track]:
    """Tracks from detections per frame (each an array [k, 4] of boxes, k may be 0), shot by shot.

    `cuts`: the first frame of every shot after the first; a shot shorter than `min_length` frames is
    skipped, as the demo skips shots shorter than its `minTrack`. `min_detections`: a track needs more
    detected frames than this (the demo's `len(track) > minTrack`, with faces detected on every frame).
    `like_demo`: linked by `link_like_demo`, in the demo's order, and kept by `min_detections` alone.
    """
    bounds = [0, *[c for c in sorted(cuts) if 0 < c < len(detections)], len(detections)]
    link = link_like_demo if like_demo else link_detections
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end - start < min_length:
            continue
        for linked in link(detections[start:end], iou_threshold, max_gap):
            if len(linked) <= min_detections:
                continue
            frames = np.array([f for f, _ in linked]) + start
            boxes = np.stack([b for _, b in linked])
            every = np.arange(frames[0], frames[-1] + 1)
            if len(every) < min_length and not like_demo:
                continue
            filled = np.stack([np.interp(every, frames, boxes[:, i]) for i in range(4)], axis=1)
            cx, cy = (filled[:, 0] + filled[:, 2]) / 2, (filled[:, 1] + filled[:, 3]) / 2
            half_w, half_h = (filled[:, 2] - filled[:, 0]) / 2, (filled[:, 3] - filled[:, 1]) / 2
            cx, cy, half_w, half_h = (_smooth(v, smooth_kernel) for v in (cx, cy, half_w, half_h))
            out.append(Track(every, np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1), filled))
    return out
