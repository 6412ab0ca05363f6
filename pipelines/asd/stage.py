"""The active-speaker stage: detect faces, track them, score each track, pick the speaker.

    frames at 25 fps (small) -> faces on every k-th frame -> IoU tracks -> a score per track
    (`sync`, or TalkNet with its checkpoint) -> the best track, if it passes the threshold, speaks

Frames for detection and scoring are decoded small (short side <= 360 px): faces in MELD's frames are
large and the mouth-motion signal does not need more. The chosen track's boxes are then used to cut
the speaker's face out of the full-resolution frames ImageBind sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from pipelines.asd.sync import DEFAULT_THRESHOLD, mouth_motion, sync_score
from pipelines.asd.tracking import Track, build_tracks
from pipelines.media import crop_square, rms_per_frame

ASD_FPS = 25.0
SCORE_SHORT_SIDE = 360  # frames for tracking and mouth motion
DETECT_SHORT_SIDE = 240  # faces are found on a further downscaled copy: Haar's cost grows with pixels


@dataclass
class SpeakerResult:
    method: str  # "sync" | "talknet" | "largest_track" (no audio to score with) | "none" (no face track)
    face_visible: bool | None  # None: a face is there, but without audio nobody can say who speaks
    score: float | None
    track: Track | None  # boxes in the small frames' pixels, frames at ASD_FPS
    scale: float  # small frame pixels -> full frame pixels
    n_tracks: int

    def box_at(self, time_s: float) -> np.ndarray | None:
        """The speaker's box (full-resolution pixels) at a time, clamped to the track's span."""
        if self.track is None:
            return None
        index = int(np.clip(round(time_s * ASD_FPS) - self.track.frames[0], 0, len(self.track) - 1))
        return self.track.boxes[index] * self.scale


@lru_cache(maxsize=1)  # one classifier per worker process, loaded on first use
def _cascade() -> cv2.CascadeClassifier:
    # alt2 found 97% of generated faces against 95% for the default cascade, and runs as fast
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml")


def detect_faces(frame_rgb: np.ndarray, min_size: int = 20) -> np.ndarray:
    """Haar-cascade face boxes (x0, y0, x1, y1) in one RGB frame, in its pixels; [k, 4] float."""
    gray = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY)
    shrink = max(1.0, min(gray.shape) / DETECT_SHORT_SIDE)
    if shrink > 1.0:
        gray = cv2.resize(gray, None, fx=1 / shrink, fy=1 / shrink, interpolation=cv2.INTER_AREA)
    faces = _cascade().detectMultiScale(cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=4, minSize=(min_size, min_size))
    if len(faces) == 0:
        return np.zeros((0, 4))
    faces = np.asarray(faces, dtype=float) * shrink
    return np.stack([faces[:, 0], faces[:, 1], faces[:, 0] + faces[:, 2], faces[:, 1] + faces[:, 3]], axis=1)


def read_small_frames(path: str, short_side: int = SCORE_SHORT_SIDE) -> tuple[np.ndarray, float]:
    """All frames resampled to 25 fps and scaled to `short_side`; returns (frames, small->full scale)."""
    import decord

    probe = decord.VideoReader(path, num_threads=1)
    height, width = probe[0].shape[:2]
    native_fps, n_native = float(probe.get_avg_fps()), len(probe)
    scale = max(1.0, min(height, width) / short_side)
    reader = probe if scale == 1.0 else decord.VideoReader(
        path, num_threads=1, width=int(round(width / scale / 2) * 2), height=int(round(height / scale / 2) * 2)
    )  # fmt: skip
    times = np.arange(0.0, n_native / native_fps, 1.0 / ASD_FPS)
    indices = np.minimum(np.round(times * native_fps).astype(int), n_native - 1)
    return reader.get_batch(indices.tolist()).asnumpy(), width / reader[0].shape[1]


def detect_every_kth(frames: np.ndarray, k: int = 5, s3fd=None) -> list[np.ndarray]:
    """Face boxes on every k-th frame and the last (Haar, or S3FD when a loaded model is given);
    the frames between get none (tracks interpolate)."""
    if s3fd is not None:
        from pipelines.asd.s3fd import detect

        # the demo runs S3FD at 0.25 of 720p; these frames are already ~360p
        def find(frame):
            return detect(s3fd, frame, scale=0.5)
    else:
        find = detect_faces
    n = len(frames)
    return [find(frames[i]) if i % k == 0 or i == n - 1 else np.zeros((0, 4)) for i in range(n)]


def face_tracks(frames: np.ndarray, detect_every: int = 5, s3fd=None) -> list[Track]:
    """Faces on every `detect_every`-th frame, linked into tracks."""
    return build_tracks(detect_every_kth(frames, detect_every, s3fd), min_length=min(10, len(frames)))


def sync_scores(frames: np.ndarray, tracks: list[Track], audio_16k: np.ndarray) -> list[float]:
    """The `sync` score of every track against the clip's speech."""
    envelope = rms_per_frame(audio_16k, 16_000, ASD_FPS, len(frames))
    return [sync_score(mouth_motion(frames[t.frames], t.boxes), envelope[t.frames]) for t in tracks]


TALKNET_WINDOWS_S = (1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6)  # the official demo's windows, averaged
TALKNET_THRESHOLD = 0.0  # a mean speaking logit above 0 means speaking


def talknet_scores(frames: np.ndarray, tracks: list[Track], audio_16k: np.ndarray, model, margin: float = 1.4) -> list[float]:
    """Mean TalkNet speaking logit of every track, over the official demo's window lengths.

    Windows of the same length are batched across all tracks (one forward per length and duration
    rather than one per window and track).
    """
    import torch

    from pipelines.asd.talknet import MFCC_PER_FRAME, mfcc_100fps, talknet_inputs

    mfcc = mfcc_100fps(audio_16k)
    inputs = []
    for track in tracks:
        gray = np.stack([cv2.cvtColor(crop_square(frames[f], box, margin), cv2.COLOR_RGB2GRAY) for f, box in zip(track.frames, track.boxes)])
        first = track.frames[0] * MFCC_PER_FRAME
        inputs.append(talknet_inputs(gray, mfcc[first : first + len(track) * MFCC_PER_FRAME]))
    sums = [np.zeros(video.shape[1], np.float64) for _, video in inputs]
    device = next(model.parameters()).device
    with torch.inference_mode():
        for seconds in TALKNET_WINDOWS_S:
            step = int(seconds * ASD_FPS)
            by_length: dict[int, list[tuple[int, int]]] = {}
            for t, (_, video) in enumerate(inputs):
                for start in range(0, video.shape[1], step):
                    by_length.setdefault(min(step, video.shape[1] - start), []).append((t, start))
            for length, windows in by_length.items():
                audio = torch.cat([inputs[t][0][:, s * MFCC_PER_FRAME : (s + length) * MFCC_PER_FRAME] for t, s in windows])
                video = torch.cat([inputs[t][1][:, s : s + length] for t, s in windows])
                for (t, s), logits in zip(windows, model(audio.to(device), video.to(device)).cpu().numpy()):
                    sums[t][s : s + length] += logits
    return [float(total.mean() / len(TALKNET_WINDOWS_S)) if total.size else float("-inf") for total in sums]


def choose_speaker(
    tracks: list[Track], scores: list[float] | None, scale: float, threshold: float = DEFAULT_THRESHOLD,
    method: str = "sync",
) -> SpeakerResult:
    """The track that best follows the speech, visible if its score passes `threshold`.

    Tracks are ranked by score x the share of the clip they cover: a correlation over a short track
    fragment (a face the detector lost for a while) is noisy and must not outrank a whole track.
    Without scores, the longest track is taken.
    """
    if not tracks:
        return SpeakerResult("none", False, None, None, scale, 0)
    if scores is None:
        return SpeakerResult("largest_track", None, None, max(tracks, key=len), scale, len(tracks))
    longest = max(len(t) for t in tracks)
    coverage = [len(t) / longest for t in tracks]
    # sync scores are correlations (>= 0): shrink short fragments; TalkNet logits are ranked as they are
    best = int(np.argmax([s * c for s, c in zip(scores, coverage)] if method == "sync" else scores))
    return SpeakerResult(method, scores[best] >= threshold, float(scores[best]), tracks[best], scale, len(tracks))


def find_speaker(
    frames: np.ndarray,
    scale: float,
    audio_16k: np.ndarray | None,
    threshold: float = DEFAULT_THRESHOLD,
    detect_every: int = 5,
    talknet=None,
    s3fd=None,
) -> SpeakerResult:
    """Pick the speaking face among the tracks in `frames` (RGB, ASD_FPS), by `sync` or a TalkNet model;
    faces by Haar cascades, or by a loaded S3FD model."""
    tracks = face_tracks(frames, detect_every, s3fd)
    has_speech = audio_16k is not None and np.any(audio_16k)
    if not (tracks and has_speech):
        return choose_speaker(tracks, None, scale)
    if talknet is not None:
        return choose_speaker(tracks, talknet_scores(frames, tracks, audio_16k, talknet), scale, TALKNET_THRESHOLD, "talknet")
    return choose_speaker(tracks, sync_scores(frames, tracks, audio_16k), scale, threshold)
