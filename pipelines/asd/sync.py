"""`sync`: a weight-free active-speaker scorer, the default when no TalkNet checkpoint is given.

A speaking face's mouth moves while there is speech and rests in the pauses; a listener's does not
follow the speech. Per track: the mouth region's motion energy per frame (mean absolute difference
of a small grayscale mouth crop between frames) is correlated with the speech envelope (RMS per
video frame, `pipelines.media.rms_per_frame`), allowing a lag of a couple of frames; the best
Pearson correlation is the score. A track below the threshold is not a visible speaker.
"""

from __future__ import annotations

import cv2
import numpy as np

MOUTH_SIZE = (32, 16)  # width, height of the resized mouth crop
DEFAULT_THRESHOLD = 0.3  # measured on generated clips: speakers 0.4-0.6, listeners mostly < 0.15


def _region_motion(frames: np.ndarray, boxes: np.ndarray, top: float, bottom: float) -> np.ndarray:
    """Motion energy per frame of a horizontal band (fractions of the box height), middle half in width."""
    height, width = frames.shape[1:3]
    crops = []
    for frame, (x0, y0, x1, y1) in zip(frames, boxes):
        w, h = x1 - x0, y1 - y0
        cx0, cx1 = int(np.clip(x0 + w / 4, 0, width - 1)), int(np.clip(x1 - w / 4, 1, width))
        cy0, cy1 = int(np.clip(y0 + h * top, 0, height - 1)), int(np.clip(y0 + h * bottom, 1, height))
        region = frame[cy0 : max(cy1, cy0 + 1), cx0 : max(cx1, cx0 + 1)]
        gray = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2GRAY)
        crops.append(cv2.resize(gray, MOUTH_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32))
    crops = np.stack(crops)
    motion = np.zeros(len(crops), np.float32)
    motion[1:] = np.abs(np.diff(crops, axis=0)).mean(axis=(1, 2))
    return motion


def mouth_motion(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Motion energy of the mouth region per frame ([T] float; the first frame is 0).

    `frames`: uint8 [T, H, W, 3]; `boxes`: the track's face box per frame, (x0, y0, x1, y1). The
    mouth is taken as the lower third of the box, its middle half in width. (Subtracting the motion
    of the band above, to cancel head motion, was tried and separated speakers worse here.)
    """
    return _region_motion(frames, boxes, 2 / 3, 1.0)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() < 1e-6 or b.std() < 1e-6:
        return 0.0  # a still mouth or a silent clip says nothing about speaking
    return float(np.corrcoef(a, b)[0, 1])


def sync_score(motion: np.ndarray, envelope: np.ndarray, max_lag: int = 2) -> float:
    """Best correlation of mouth motion and speech envelope over lags of -max_lag..max_lag frames."""
    motion, envelope = motion[1:], envelope[1:]  # frame 0 has no motion by construction
    best = 0.0
    for lag in range(-max_lag, max_lag + 1):
        a = motion[max(lag, 0) : len(motion) + min(lag, 0)]
        b = envelope[max(-lag, 0) : len(envelope) + min(-lag, 0)]
        best = max(best, _pearson(a, b))
    return best
