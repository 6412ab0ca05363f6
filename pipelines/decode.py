"""Decode one clip into what the encoders need: 16 kHz mono audio features and the speaker's face.

    decode_media (CPU) -> detect_faces_step (S3FD, batched) -> track_step (CPU) -> score_step (TalkNet,
    batched) -> crop_speaker (CPU)

The preprocessing job runs these steps as its Ray stages (the model steps in actor pools, only when
their checkpoints are given); `decode_clip` runs them in order in this process. Audio goes through PyAV
(bundled FFmpeg; decord's AudioReader leaks memory per clip), video through decord. The active-speaker
stage (`pipelines.asd.stage`) finds the speaking face on small 25 fps frames; the 10 frames ImageBind's
recipe samples are then read at full resolution and cut around the speaker's box (a square grown by
`crop_margin`), so every clip yields frames of one shape. With no visible speaker the centre square is
used and the row says so. A bad clip never raises: it comes back with a failure reason, and whichever
modality did decode is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np

from pipelines.asd.stage import (
    ASD_FPS, DEMO_MP3_DELAY, SCORE_SHORT_SIDE, SpeakerResult, SpeakerWork, s3fd_detections, score_with_talknet,
    start_speaker, track_speaker,
)  # fmt: skip
from pipelines.asd.sync import DEFAULT_THRESHOLD
from pipelines.imagebind import IMAGE_SIZE, SAMPLE_RATE, audio_features, resample_channels, video_frame_indices
from pipelines.media import crop_square, probe_clip

log = logging.getLogger(__name__)


# Peak RSS of one decode (sync speaker stage) on lavfi clips (`benchmarks/decode_memory.py`): 3 s 720p
# 1.13 GiB, 20 s 360p 1.56 GiB, 20 s 1080p 3.0-3.75 GiB. It grows with the frames read at ASD_FPS: each
# is held small (short side SCORE_SHORT_SIDE, 3 bytes a pixel) for tracking, plus up to ~2 bytes a
# full-size pixel that decord holds while scaling. With an S3FD stage after it (`frames_out`) the task's
# output is the frames themselves, serialised: the small ones and, in faithful mode, S3FD's input (0.25
# of the full size) a second time (fast mode's S3FD input is made from the small frames in the actor).
# The estimate adds 20% and rounds up to 512 MiB steps.
DECODE_BASE_MEMORY = 1024**3  # a decode worker with PyAV, decord, OpenCV and torch imported
_MEMORY_STEP = 512 * 1024**2


def decode_memory(
    width: int, height: int, seconds: float, fps: float, frames_out: bool = False, s3fd_input: bool = False
) -> int:
    """Bytes to request for decoding a clip of this size (the worker's own footprint included)."""
    frames = seconds * max(ASD_FPS, min(fps, 60.0))  # frames read for the speaker stage (native above 25 fps)
    small = min(1.0, SCORE_SHORT_SIDE / max(1, min(width, height))) ** 2 * width * height
    per_frame = 3 * small + 2.5 * width * height
    if frames_out:
        per_frame += 3 * small + (2 * 3 * 0.25**2 * width * height if s3fd_input else 0)
    need = DECODE_BASE_MEMORY + 1.2 * frames * per_frame
    return int(-(-need // _MEMORY_STEP) * _MEMORY_STEP)


@dataclass(frozen=True)
class SpeakerSettings:
    method: str = "sync"  # "sync" | "talknet" (needs talknet_checkpoint) | "none" (centre square)
    threshold: float = DEFAULT_THRESHOLD  # for sync; TalkNet's own threshold is a logit of 0
    detect_every: int = 5
    crop_margin: float = 1.4  # crop side / face box side: keeps chin, hair and some context
    talknet_checkpoint: str | None = None
    save_crops: str | None = None  # folder: the speaker's face track as <split>/<diaD_uttU>.mp4
    s3fd_checkpoint: str | None = None  # faces by S3FD (sfd_face.pth) instead of Haar cascades
    faithful: bool | None = None  # the TalkNet demo's way (every frame, ...); None: on when a checkpoint is given

    @property
    def is_faithful(self) -> bool:
        return self.faithful if self.faithful is not None else bool(self.talknet_checkpoint or self.s3fd_checkpoint)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU when the task was given one


@lru_cache(maxsize=2)  # one loaded model per checkpoint and worker process (Ray reuses its workers)
def talknet_model(checkpoint: str):
    from pipelines.asd.talknet import load_talknet

    return load_talknet(checkpoint).to(_device())


@lru_cache(maxsize=2)
def s3fd_model(checkpoint: str):
    from pipelines.asd.s3fd import load_s3fd

    return load_s3fd(checkpoint).to(_device())


@dataclass
class DecodedClip:
    key: str
    path: str | None = None
    duration: float | None = None
    fps: float | None = None
    has_audio: bool = False
    audio: np.ndarray | None = None  # float32 [3, 1, 128, 204], ImageBind's normalised fbank clips
    frames: np.ndarray | None = None  # uint8 [5, 2, H, W, 3], short side 224
    face_visible: bool | None = None
    speaker_box: tuple[float, float, float, float] | None = None  # median, frame-relative (x0, y0, x1, y1)
    asd_method: str | None = None
    asd_score: float | None = None
    speaker_track_frames: int | None = None
    failure: tuple[str, str, str] | None = None  # (stage, reason, detail)
    speaker: SpeakerWork | None = None  # the speaker stage in progress, between decode and `crop_speaker`
    video: bool = False  # the video stream is there to read (the probe found it)

    def fail(self, stage: str, reason: str, exc: BaseException | str) -> None:
        """Record the first failure of this clip (later steps keep what they can)."""
        if self.failure is None:
            self.failure = (stage, reason, exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}")


@dataclass
class ClipAudio:
    """A clip's first audio stream, decoded once."""

    mono_16k: np.ndarray  # float32 [N]: FFmpeg's mono downmix at 16 kHz, what TalkNet's demo and `sync` hear
    channels: np.ndarray | None  # float32 [C, N'] at `rate`, no downmix, as ImageBind's loader reads them
    rate: int  # (`torchaudio.load`: FFmpeg's decoder)


def read_audio(path: Path | str, channels: bool = True, demo_delay: bool = False) -> ClipAudio | None:
    """The first audio stream, decoded once into both forms (`channels=False`: the 16 kHz mono only);
    None if the clip has no audio.

    The mono is FFmpeg's downmix to s16 (`ffmpeg -ac 1 -ar 16000` into a wav, as the TalkNet demo): to an
    integer format FFmpeg's resampler normalises the downmix (0.5 L + 0.5 R), to float it does not
    (0.707 L + 0.707 R, 1.41x louder). `demo_delay`: the mono starts with the silence the demo's own audio
    starts with: the MP3 delay of its AVI (`DEMO_MP3_DELAY` samples at the clip's rate), after the time the
    stream starts late in the file, which the demo's `-async 1` fills."""
    import av  # on use: importing the job (e.g. its encoder stage alone) needs no PyAV

    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        mono = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        planar = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate) if channels else None
        mono_chunks, planar_chunks = [], []
        start = (container.start_time or 0) / 1_000_000
        for index, frame in enumerate(chain(container.decode(audio=0), [None])):  # None flushes both resamplers
            if demo_delay and index == 0 and frame is not None:
                late = max(0, round(((frame.time or start) - start) * frame.sample_rate))
                silence = _silence_like(frame, DEMO_MP3_DELAY + late)
                mono_chunks += [out.to_ndarray().reshape(-1) for out in mono.resample(silence)]
            mono_chunks += [out.to_ndarray().reshape(-1) for out in mono.resample(frame)]
            if planar is not None:
                planar_chunks += [out.to_ndarray() for out in planar.resample(frame)]
        rate, n_channels = stream.rate, len(stream.layout.channels)
    waveform = np.concatenate(mono_chunks).astype(np.float32) / 32768 if mono_chunks else np.zeros(0, np.float32)
    if planar is None:
        return ClipAudio(waveform, None, rate)
    return ClipAudio(waveform, np.concatenate(planar_chunks, axis=1) if planar_chunks else np.zeros((n_channels, 0), np.float32), rate)


def _silence_like(frame, samples: int):
    """A silent frame of `samples` samples in `frame`'s format, layout and rate."""
    import av

    silence = av.AudioFrame(format=frame.format.name, layout=frame.layout.name, samples=samples)
    for plane in silence.planes:
        plane.update(bytes(plane.buffer_size))
    silence.sample_rate = frame.sample_rate
    return silence


def read_audio_16k(path: Path | str, demo_delay: bool = False) -> np.ndarray | None:
    """The first audio stream as 16 kHz mono float32 (FFmpeg's downmix), or None if the clip has none."""
    audio = read_audio(path, channels=False, demo_delay=demo_delay)
    return audio.mono_16k if audio is not None else None


def decode_media(key: str, path: Path | str | None, speaker: SpeakerSettings = SpeakerSettings()) -> DecodedClip:
    """First step (CPU): probe, audio (ImageBind's features; the 16 kHz mono the speaker stage hears) and
    the speaker stage's frames and shot cuts. Failures are recorded, never raised."""
    out = DecodedClip(key=key, path=str(path) if path is not None else None)
    if path is None:
        out.failure = ("read", "missing_file", "CSV row without a clip")
        return out
    probe = probe_clip(path)
    out.duration, out.fps, out.has_audio = probe.duration, probe.fps, probe.has_audio
    if not probe.ok:
        out.failure = ("decode", probe.reason or "unknown", probe.detail)
        # without audio the face can still be embedded, without video the voice
        if not (probe.reason == "no_audio_stream" or (probe.reason == "no_video_stream" and probe.has_audio)):
            return out
    out.video = probe.reason != "no_video_stream"
    waveform = None
    try:
        if probe.has_audio:
            audio = read_audio(path, demo_delay=speaker.is_faithful)
            waveform = audio.mono_16k if audio is not None else None
            if waveform is not None and waveform.size >= SAMPLE_RATE * 0.025:  # one 25 ms fbank window
                # TalkNet and `sync` hear FFmpeg's mono downmix (as the TalkNet demo); ImageBind channel 0
                out.audio = audio_features(resample_channels(audio.channels, audio.rate))
    except Exception as exc:  # noqa: BLE001 - a broken clip must not stop the job
        out.fail("decode", "audio_decode_error", exc)
    if speaker.method in ("sync", "talknet") and out.video:
        try:
            out.speaker = start_speaker(
                str(path), waveform, speaker.is_faithful, speaker.detect_every, speaker.threshold,
                s3fd=speaker.s3fd_checkpoint is not None, keep_small=speaker.save_crops is not None,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the frames ImageBind needs may still decode
            out.fail("decode", "video_decode_error", exc)
    return out


def detect_faces_step(clips: list[DecodedClip], s3fd) -> None:
    """S3FD over the frames of several clips at once; a batch that fails is retried clip by clip."""
    _batched_step(clips, lambda works: s3fd_detections(works, s3fd), "face_detection_error")


def track_step(clip: DecodedClip, talknet: bool) -> DecodedClip:
    """CPU: faces (Haar, unless S3FD found them), tracks within shots; `sync` picks the speaker here."""
    if clip.speaker is not None:
        try:
            track_speaker(clip.speaker, talknet)
        except Exception as exc:  # noqa: BLE001 - the clip goes on with a centre crop
            clip.fail("speaker", "tracking_error", exc)
            clip.speaker = None
    return clip


def score_step(clips: list[DecodedClip], talknet) -> None:
    """TalkNet over the tracks of several clips at once; a batch that fails is retried clip by clip."""
    _batched_step(clips, lambda works: score_with_talknet(works, talknet), "speaker_scoring_error")


def _batched_step(clips: list[DecodedClip], step, reason: str) -> None:
    pending = [c for c in clips if c.speaker is not None]
    try:
        step([c.speaker for c in pending])
        return
    except Exception:  # noqa: BLE001 - one bad clip must not fail its batch
        pass
    for clip in pending:
        try:
            step([clip.speaker])
        except Exception as exc:  # noqa: BLE001 - the clip goes on with a centre crop
            clip.fail("speaker", reason, exc)
            clip.speaker = None


def crop_speaker(clip: DecodedClip, speaker: SpeakerSettings = SpeakerSettings()) -> DecodedClip:
    """Last step (CPU): the speaker's fields, and the 10 frames ImageBind's recipe samples, read at full
    resolution and cut around the speaker (the centre square when nobody visible speaks)."""
    work, clip.speaker = clip.speaker, None
    result = work.result if work is not None else None
    if result is not None:
        clip.asd_method, clip.asd_score, clip.face_visible = result.method, result.score, result.face_visible
    if not clip.video:
        return clip
    try:
        _crop_frames(clip, result, speaker)
        if speaker.save_crops and result is not None and result.track is not None:
            save_track_video(Path(speaker.save_crops) / f"{clip.key}.mp4", work.clip.small, result, speaker.crop_margin)
    except Exception as exc:  # noqa: BLE001
        clip.fail("decode", "video_decode_error", exc)
    if clip.audio is None and clip.frames is not None and clip.failure is None:
        clip.failure = ("decode", "no_audio_stream", "audio missing or empty; vision only")
    return clip


def decode_clip(key: str, path: Path | str | None, speaker: SpeakerSettings = SpeakerSettings()) -> DecodedClip:
    """Decode one clip for ImageBind, in this process: the job's steps in order, models loaded once per
    process. Failures are returned, never raised."""
    clip = decode_media(key, path, speaker)
    if speaker.s3fd_checkpoint:
        detect_faces_step([clip], s3fd_model(speaker.s3fd_checkpoint))
    track_step(clip, talknet=speaker.method == "talknet")
    if speaker.method == "talknet":
        score_step([clip], talknet_model(speaker.talknet_checkpoint))
    return crop_speaker(clip, speaker)


def save_track_video(target: Path, frames: np.ndarray, result: SpeakerResult, margin: float) -> None:
    """The chosen track's face crops (224 px, 25 fps) as an H.264 mp4, for looking at."""
    import av

    target.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(target), "w") as container:
        stream = container.add_stream("libx264", rate=int(ASD_FPS))
        stream.width = stream.height = IMAGE_SIZE
        stream.pix_fmt = "yuv420p"
        for index, box in zip(result.track.frames, result.track.boxes):
            image = av.VideoFrame.from_ndarray(crop_square(frames[index], box, margin), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))


def _crop_frames(out: DecodedClip, result: SpeakerResult | None, settings: SpeakerSettings) -> None:
    """Fill `out.frames` ([5, 2, 224, 224, 3]) with the speaker's face, and the speaker's box."""
    import decord

    reader = decord.VideoReader(out.path, num_threads=1)
    n_frames, fps = len(reader), float(reader.get_avg_fps())
    indices = video_frame_indices(n_frames, fps)
    unique, inverse = np.unique(indices, return_inverse=True)
    full = reader.get_batch(unique.tolist()).asnumpy()
    height, width = full.shape[1:3]
    if result is not None and result.track is not None:
        out.speaker_track_frames = len(result.track)
        median = np.median(result.track.boxes, axis=0) * result.scale
        out.speaker_box = tuple(float(v) for v in median / [width, height, width, height])
    use_track = result is not None and result.track is not None and result.face_visible is not False
    side = min(height, width)
    centre = np.array([(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2])
    crops = [
        crop_square(frame, result.box_at(index / fps), settings.crop_margin) if use_track else crop_square(frame, centre, 1.0)
        for frame, index in zip(full, unique)
    ]  # fmt: skip
    out.frames = np.stack(crops)[inverse.reshape(-1)].reshape(*indices.shape, IMAGE_SIZE, IMAGE_SIZE, 3)
