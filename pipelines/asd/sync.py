"""`sync`: a weight-free active-speaker scorer, the default when no TalkNet checkpoint is given.

A speaking face's mouth opens with the speech and rests in the pauses; a listener's does not follow
the speech. Per track: how far the mouth region is from its resting look in each frame (mean absolute
difference of a small grayscale mouth crop from the track's mouth in its quiet frames) is
correlated with the speech envelope (RMS per video frame, `pipelines.media.rms_per_frame`), allowing a
lag of a couple of frames; the best Pearson correlation is the score. A track below the threshold is
not a visible speaker. Both signals lose their slow part first (each minus its moving mean over
`DETREND_FRAMES`): a head drifting while the speech starts and stops moves a listener's mouth crop
with the speech's on and off, not with its syllables.

Why the mouth's opening and not its motion (the frame-to-frame change, merg's scorer before): the
opening follows the loudness itself, the motion only its changes, and a moving head feeds a listener's
mouth motion as much as a speaker's. On a held-out generated set (`benchmarks/asd.py`, seed 4, 418
face tracks of two-face clips), at the default thresholds: 99.5% of speakers' tracks pass and 93.2%
of listeners' stay below (the motion scorer at 0.3: 97.2% and 75.8%); speaker accuracy on clips with
a cut 100% of 66 (97.0%).
"""

from __future__ import annotations

import cv2
import numpy as np

MOUTH_SIZE = (32, 16)  # width, height of the resized mouth crop
REST_QUANTILE = 0.25  # the mouth at rest: the frames at or below the envelope's lower quartile
DETREND_FRAMES = 9  # 0.36 s at 25 fps: slower than syllables (4-5 a second), faster than a head's drift
DEFAULT_THRESHOLD = 0.5  # measured on generated clips (see above)


def mouth_crops(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The mouth region of every frame: the lower third of the face box, its middle half in width, grey
    and resized to `MOUTH_SIZE` (float32 [T, 16, 32]). `frames`: uint8 [T, H, W, 3], `boxes` (x0, y0, x1, y1)."""
    height, width = frames.shape[1:3]
    crops = []
    for frame, (x0, y0, x1, y1) in zip(frames, boxes):
        w, h = x1 - x0, y1 - y0
        cx0, cx1 = int(np.clip(x0 + w / 4, 0, width - 1)), int(np.clip(x1 - w / 4, 1, width))
        cy0, cy1 = int(np.clip(y0 + h * 2 / 3, 0, height - 1)), int(np.clip(y1, 1, height))
        region = frame[cy0 : max(cy1, cy0 + 1), cx0 : max(cx1, cx0 + 1)]
        gray = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2GRAY)
        crops.append(cv2.resize(gray, MOUTH_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32))
    return np.stack(crops)


def mouth_opening(crops: np.ndarray, envelope: np.ndarray) -> np.ndarray:
    """How far the mouth is from rest in each frame ([T] float): the mean absolute difference of each
    crop from the rest look, the per-pixel median of the crops of the quiet frames (at or below the
    envelope's `REST_QUANTILE`). A quiet frame is measured against the median of the other quiet frames:
    a median is nearer the crops it is built from, so otherwise a still face's pixel noise alone would
    put the quiet frames nearest rest and correlate with the speech."""
    quiet = np.flatnonzero(envelope <= np.quantile(envelope, REST_QUANTILE))
    opening = np.abs(crops - np.median(crops[quiet], axis=0)).mean(axis=(1, 2))
    if len(quiet) > 1:
        opening[quiet] = np.abs(crops[quiet] - leave_one_out_medians(crops[quiet])).mean(axis=(1, 2))
    return opening


def leave_one_out_medians(x: np.ndarray) -> np.ndarray:
    """`out[i]` = the median over axis 0 of `x` without `x[i]` (n >= 2), as `np.median` gives it, for all
    i at once: with the values sorted per element, dropping the one of rank r shifts those above it
    down by one (one sort instead of n medians: 0.04 s against ~2 s for 450 frames)."""
    n = len(x)
    ordered = np.sort(x, axis=0)
    rank = np.argsort(np.argsort(x, axis=0, kind="stable"), axis=0, kind="stable")

    def kth_of_the_others(k: int) -> np.ndarray:
        return np.where(k < rank, ordered[k][None], ordered[k + 1][None])

    m = n - 1  # values left
    return kth_of_the_others(m // 2) if m % 2 else (kth_of_the_others(m // 2 - 1) + kth_of_the_others(m // 2)) / 2


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() < 1e-6 or b.std() < 1e-6:
        return 0.0  # a still mouth or a silent clip says nothing about speaking
    return float(np.corrcoef(a, b)[0, 1])


def detrend(signal: np.ndarray, frames: int = DETREND_FRAMES) -> np.ndarray:
    """`signal` minus its centred moving mean over an odd number of `frames` (the ends repeat the edge
    values)."""
    assert frames % 2 == 1, "a centred window has an odd length"
    signal = np.asarray(signal, np.float64)
    padded = np.pad(signal, frames // 2, mode="edge")
    return signal - np.convolve(padded, np.ones(frames) / frames, mode="valid")


def sync_score(opening: np.ndarray, envelope: np.ndarray, max_lag: int = 2) -> float:
    """Best correlation of mouth opening and speech envelope, both detrended, over lags of
    -max_lag..max_lag frames."""
    opening, envelope = detrend(opening), detrend(envelope)
    best = 0.0
    for lag in range(-max_lag, max_lag + 1):
        a = opening[max(lag, 0) : len(opening) + min(lag, 0)]
        b = envelope[max(-lag, 0) : len(envelope) + min(-lag, 0)]
        best = max(best, _pearson(a, b))
    return best


def track_sync_score(frames: np.ndarray, boxes: np.ndarray, envelope: np.ndarray) -> float:
    """The `sync` score of one face track: its frames, its boxes in them, the envelope under them."""
    return sync_score(mouth_opening(mouth_crops(frames, boxes), envelope), envelope)
