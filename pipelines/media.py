"""Cheap checks on a clip file, before any decoding work is spent on it, and small media helpers.

`probe_clip` opens the container with PyAV (it bundles its own FFmpeg, so no system binary is
needed) and classifies the clip as usable or faulty with a short machine-readable reason.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Shorter than this, neither TalkNet's windows nor ImageBind's 2 s clips have anything to see.
MIN_DURATION_S = 0.3
MIN_FRAMES = 2


@dataclass(frozen=True)
class ClipProbe:
    ok: bool
    reason: str | None = None  # machine-readable, e.g. "empty_file", "no_audio_stream"
    detail: str = ""
    duration: float | None = None
    fps: float | None = None
    n_frames: int | None = None
    width: int | None = None
    height: int | None = None
    has_audio: bool = False


def check_clip_path(path: Path | str) -> tuple[str, str] | None:
    """(reason, detail) when `path` is not a readable regular file, else None.

    The one path check that hashing, probing and decoding share. It never reads from the path before
    knowing it is a regular file: opening a FIFO or a device could block or read forever.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return "dangling_link", f"{path} -> {os.readlink(path)} (target missing)"
        return "missing_file", f"{path} is gone"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "link_loop", f"{path}: symbolic links loop"
        return "unreadable", f"{path}: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "is_directory", f"{path} is a directory"
    if not stat.S_ISREG(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        return "not_regular_file", f"{path} is a {kind}"
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return "unreadable", f"{path}: {exc.strerror or exc}"
    return None


def outside_root(path: Path | str, roots: tuple[Path, ...]) -> tuple[str, str] | None:
    """("outside_root", detail) when `path` resolves (through its links) outside every folder of `roots`
    (resolved themselves), else None: a link out of the data, e.g. to /etc/hostname, is refused unread."""
    target = Path(os.path.realpath(path))
    if any(target.is_relative_to(os.path.realpath(root)) for root in roots):
        return None
    return "outside_root", f"{path} is a link to {target}, outside the MELD root"


def clip_geometry(path: Path | str) -> tuple[int, int, float, float] | None:
    """(width, height, seconds, fps) from the container header alone (no demuxing); None if unreadable.
    A clip in object storage is read in ranges (only the header's)."""
    import av

    from featurestore import storage

    if not storage.is_uri(path) and check_clip_path(path) is not None:
        return None
    try:
        source = storage.open_input_file(path) if storage.is_uri(path) else str(path)
        with av.open(source) as container:
            video = next(iter(container.streams.video), None)
            if video is None:
                return None
            fps, seconds = _rate_and_duration(container, video)
            return video.codec_context.width, video.codec_context.height, seconds or 0.0, fps or 25.0
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def _rate_and_duration(container, video) -> tuple[float | None, float | None]:
    """A video stream's average fps and its duration in seconds (the container's when the stream has none)."""
    import av

    fps = float(video.average_rate) if video.average_rate else None
    duration = float(video.duration * video.time_base) if video.duration else None
    if duration is None and container.duration:
        duration = container.duration / av.time_base
    return fps, duration


def rms_per_frame(audio: np.ndarray, sample_rate: int, fps: float, n_frames: int) -> np.ndarray:
    """RMS loudness of the audio under each video frame ([n_frames] float32)."""
    hop = sample_rate / fps
    rms = np.zeros(n_frames, np.float32)
    for i in range(n_frames):
        chunk = audio[int(i * hop) : int((i + 1) * hop)]
        rms[i] = np.sqrt(np.mean(np.square(chunk, dtype=np.float64))) if chunk.size else 0.0
    return rms


def crop_square(frame: np.ndarray, box: np.ndarray, margin: float, size: int = 224) -> np.ndarray:
    """A square around `box` (x0, y0, x1, y1) grown by `margin`, kept inside the frame, resized to `size`."""
    height, width = frame.shape[:2]
    side = int(min(max(box[2] - box[0], box[3] - box[1]) * margin, height, width))
    side = max(side, 2)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(np.clip(cx - side / 2, 0, width - side))
    y0 = int(np.clip(cy - side / 2, 0, height - side))
    return cv2.resize(frame[y0 : y0 + side, x0 : x0 + side], (size, size), interpolation=cv2.INTER_AREA)


def probe_clip(path: Path | str, decode_check: bool = False) -> ClipProbe:
    """Classify one clip from its container and packets; `decode_check` also decodes every frame."""
    import av  # on use: the helpers above need no PyAV

    path = Path(path)
    bad_path = check_clip_path(path)
    if bad_path is not None:
        return ClipProbe(False, *bad_path)
    if path.stat().st_size == 0:
        return ClipProbe(False, "empty_file", "0 bytes")
    with path.open("rb") as fh:
        head = fh.read(12)
    if head[4:8] != b"ftyp":
        return ClipProbe(False, "not_mp4", "no ftyp box: not an MP4 container")  # its bytes are not ours to copy
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        return ClipProbe(False, "unreadable_container", str(exc))
    with container:
        video = next(iter(container.streams.video), None)
        audio = next(iter(container.streams.audio), None)
        if video is None:  # audio only: its sound can still be embedded
            duration = container.duration / av.time_base if container.duration else None
            detail = "audio only; no frames" if audio is not None else "neither video nor audio"
            return ClipProbe(False, "no_video_stream", detail, duration=duration, has_audio=audio is not None)
        fps, duration = _rate_and_duration(container, video)
        n_frames = video.frames or (round(duration * fps) if duration and fps else None)
        info = dict(
            duration=duration, fps=fps, n_frames=n_frames, width=video.codec_context.width,
            height=video.codec_context.height, has_audio=audio is not None,
        )  # fmt: skip
        # Demuxing reads every packet header but decodes nothing: cheap, and it finds truncation.
        try:
            packets = sum(1 for packet in container.demux(video) if packet.size)
        except av.error.FFmpegError as exc:
            return ClipProbe(False, "truncated", f"demux failed: {exc}", **info)
        if video.frames and packets < video.frames:
            return ClipProbe(False, "truncated", f"{packets} of {video.frames} frames present", **info)
        if decode_check:
            container.seek(0)
            try:
                info["n_frames"] = sum(1 for _ in container.decode(video=0))
            except av.error.FFmpegError as exc:
                return ClipProbe(False, "decode_error", str(exc), **info)
    if audio is None:
        return ClipProbe(False, "no_audio_stream", **info)
    if (info["n_frames"] or 0) < MIN_FRAMES:
        return ClipProbe(False, "too_few_frames", f"{info['n_frames']} frame(s)", **info)
    if duration is None or duration < MIN_DURATION_S:
        return ClipProbe(False, "too_short", f"{duration} s < {MIN_DURATION_S} s", **info)
    return ClipProbe(True, **info)
