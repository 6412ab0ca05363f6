"""Decode one clip into what the encoders need: 16 kHz mono audio features and the sampled frames.

Audio goes through PyAV (bundled FFmpeg; decord's AudioReader leaks memory per clip), video through
decord, reading only the 10 frames ImageBind's recipe samples. The speaker's face is cropped here
(the largest detected face until the active-speaker stage replaces it; the centre square when none
is found), so frame stacks stay small and of one shape. A bad clip never raises: it comes back with a failure
reason, and whichever modality did decode is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from pipelines.imagebind import IMAGE_SIZE, SAMPLE_RATE, audio_features, short_side_resize, video_frame_indices
from pipelines.media import probe_clip

log = logging.getLogger(__name__)

FACE_MARGIN = 1.4  # crop side / detected face side: keeps chin, hair and some context


@dataclass
class DecodedClip:
    key: str
    sha256: str | None = None
    duration: float | None = None
    fps: float | None = None
    has_audio: bool = False
    audio: np.ndarray | None = None  # float32 [3, 1, 128, 204], ImageBind's normalised fbank clips
    frames: np.ndarray | None = None  # uint8 [5, 2, H, W, 3], short side 224
    face_visible: bool | None = None
    speaker_box: tuple[float, float, float, float] | None = None  # frame-relative (x0, y0, x1, y1)
    failure: tuple[str, str, str] | None = None  # (stage, reason, detail)


def read_audio_16k(path: Path | str) -> np.ndarray | None:
    """The first audio stream as 16 kHz mono float32, or None if the clip has none."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):  # flush
            chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def _largest_face(frame: np.ndarray) -> tuple[int, int, int, int] | None:
    import cv2

    cascade = _cascade()
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(24, 24))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return int(x), int(y), int(w), int(h)


_CASCADE = None


def _cascade():
    global _CASCADE  # one classifier per worker process, loaded on first use
    if _CASCADE is None:
        import cv2

        _CASCADE = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    return _CASCADE


def crop_square(frames: np.ndarray, box: tuple[int, int, int, int], margin: float = FACE_MARGIN) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A square crop around `box` (x, y, w, h) grown by `margin`, shifted to stay inside the frame."""
    height, width = frames.shape[-3:-1]
    x, y, w, h = box
    side = int(min(max(w, h) * margin, height, width))
    cx, cy = x + w / 2, y + h / 2
    x0 = int(np.clip(cx - side / 2, 0, width - side))
    y0 = int(np.clip(cy - side / 2, 0, height - side))
    return frames[..., y0 : y0 + side, x0 : x0 + side, :], (x0, y0, x0 + side, y0 + side)


def decode_clip(key: str, path: Path | str | None, sha256: str | None = None, detect_face: bool = True) -> DecodedClip:
    """Decode one clip for ImageBind; failures are returned, never raised."""
    out = DecodedClip(key=key, sha256=sha256)
    if path is None:
        out.failure = ("read", "missing_file", "CSV row without a clip")
        return out
    probe = probe_clip(path)
    out.duration, out.fps, out.has_audio = probe.duration, probe.fps, probe.has_audio
    fatal = {"missing_file", "empty_file", "not_mp4", "unreadable_container", "no_video_stream", "truncated"}
    if not probe.ok:
        out.failure = ("decode", probe.reason or "unknown", probe.detail)
        if probe.reason in fatal or probe.reason in ("too_short", "too_few_frames"):
            return out
    try:
        if probe.has_audio:
            waveform = read_audio_16k(path)
            if waveform is not None and waveform.size >= SAMPLE_RATE * 0.025:  # one 25 ms fbank window
                out.audio = audio_features(waveform)
        out.frames, out.face_visible, out.speaker_box = _decode_frames(path, detect_face)
    except Exception as exc:  # noqa: BLE001 - a broken clip must not stop the job
        out.failure = ("decode", "decode_error", f"{type(exc).__name__}: {exc}")
    if out.audio is None and out.frames is not None and out.failure is None:
        out.failure = ("decode", "no_audio_stream", "audio missing or empty; vision only")
    return out


def _decode_frames(path: Path | str, detect_face: bool):
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    n_frames, fps = len(reader), float(reader.get_avg_fps())
    indices = video_frame_indices(n_frames, fps)
    unique, inverse = np.unique(indices, return_inverse=True)
    frames = reader.get_batch(unique.tolist()).asnumpy()[inverse.reshape(-1)]
    frames = frames.reshape(*indices.shape, *frames.shape[1:])  # [5, 2, H, W, 3]
    height, width = frames.shape[-3:-1]
    face = _largest_face(frames[len(frames) // 2, 0]) if detect_face else None
    box = None
    if face is not None:
        frames, (x0, y0, x1, y1) = crop_square(frames, face)
        box = (x0 / width, y0 / height, x1 / width, y1 / height)
    else:  # no face found: the centre square, so every clip yields the same [5, 2, 224, 224, 3]
        side = min(height, width)
        frames, _ = crop_square(frames, ((width - side) // 2, (height - side) // 2, side, side), margin=1.0)
    frames = short_side_resize(frames, IMAGE_SIZE)
    return frames, (None if not detect_face else face is not None), box
