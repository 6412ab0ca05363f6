"""The active-speaker stage: detect faces, track them within shots, score each track, pick the speaker.

    frames at 25 fps -> shot cuts (PySceneDetect's ContentDetector) -> faces (Haar, or S3FD with its
    checkpoint) -> IoU tracks within each shot -> a score per track (`sync`, or TalkNet with its
    checkpoint) -> the best track, if it passes the threshold, speaks

Two modes. `faithful` (the default whenever a TalkNet or S3FD checkpoint is given) does what TalkNet's
demo does: S3FD on every frame at 0.25 of the full-resolution frame, tracks of more than 10 detected
frames, TalkNet's face crops cut from the full-resolution frames (two streaming passes over the clip,
so a long clip's full frames are never all in memory at once). `fast` detects on every k-th frame of
small frames (short side <= 360 px) and keeps tracks spanning 10 frames. Either way the chosen track's
boxes (small-frame pixels x `scale`) cut the speaker's face out of the full-resolution frames ImageBind sees.

The stage is a sequence of steps over a `SpeakerWork` (see there) so that the preprocessing job can run
each where it belongs: reading and tracking in CPU tasks, S3FD and TalkNet in actor pools that batch
several clips per call. `speaker_for_clip` runs them all in this process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import cv2
import numpy as np

from pipelines.asd.shots import ShotCuts, shot_cuts
from pipelines.asd.sync import DEFAULT_THRESHOLD, track_sync_score
from pipelines.asd.tracking import Track, build_tracks, iou
from pipelines.media import rms_per_frame

ASD_FPS = 25.0
SCORE_SHORT_SIDE = 360  # frames for tracking and the mouth crops of `sync`
DETECT_SHORT_SIDE = 240  # faces are found on a further downscaled copy: Haar's cost grows with pixels
MIN_TRACK = 10  # the demo's --minTrack: shorter shots are skipped; faithful tracks need more detections
S3FD_BATCH = 16  # frames per S3FD forward on a GPU


@dataclass
class SpeakerResult:
    method: str  # "sync" | "talknet" | "largest_track" (no audio to score with) | "none" (no face track)
    face_visible: bool | None  # None: a face is there, but without audio nobody can say who speaks
    score: float | None
    track: Track | None  # boxes in the small frames' pixels, frames at ASD_FPS
    scale: float  # small frame pixels -> full frame pixels
    n_tracks: int
    # the speaker in other shots: the best-ranked track of every other shot
    other_shots: list[Track] = field(default_factory=list)

    def box_at(self, time_s: float) -> np.ndarray | None:
        """The speaker's box (full-resolution pixels) at a time: from the nearest in time of `track` and
        `other_shots` (after a cut the speaker is another track), clamped to its span."""
        if self.track is None:
            return None
        frame = round(time_s * ASD_FPS)
        track = min([self.track, *self.other_shots], key=lambda t: max(t.frames[0] - frame, frame - t.frames[-1], 0))
        index = int(np.clip(frame - track.frames[0], 0, len(track) - 1))
        return track.boxes[index] * self.scale


@lru_cache(maxsize=1)  # one classifier per worker process, loaded on first use
def _cascade() -> cv2.CascadeClassifier:
    # alt2 found 97% of generated faces against 95% for the default cascade, and runs as fast
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml")


@lru_cache(maxsize=1)
def _clahe() -> cv2.CLAHE:
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))


def detect_faces(frame_rgb: np.ndarray, min_size: int = 20) -> np.ndarray:
    """Haar-cascade face boxes (x0, y0, x1, y1) in one RGB frame, in its pixels; [k, 4] float."""
    gray = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY)
    shrink = max(1.0, min(gray.shape) / DETECT_SHORT_SIDE)
    if shrink > 1.0:
        gray = cv2.resize(gray, None, fx=1 / shrink, fy=1 / shrink, interpolation=cv2.INTER_AREA)
    # local contrast (CLAHE), not a global histogram equalisation: on generated clips it found 99.6% of
    # faces against 96.6%, the gain all on darker faces, with no false detections (`benchmarks/asd.py`)
    faces = _cascade().detectMultiScale(_clahe().apply(gray), scaleFactor=1.1, minNeighbors=4, minSize=(min_size, min_size))
    if len(faces) == 0:
        return np.zeros((0, 4))
    faces = np.asarray(faces, dtype=float) * shrink
    return np.stack([faces[:, 0], faces[:, 1], faces[:, 0] + faces[:, 2], faces[:, 1] + faces[:, 3]], axis=1)


def _frame_indices_25fps(n_native: int, native_fps: float) -> np.ndarray:
    """Fast mode: the source frame nearest in time to each 25-fps frame."""
    times = np.arange(0.0, n_native / native_fps, 1.0 / ASD_FPS)
    return np.minimum(np.round(times * native_fps).astype(int), n_native - 1)


# The TalkNet demo's frames are `ffmpeg -i clip -r 25 video.avi` then `ffmpeg -i video.avi -f image2
# %06d.jpg`. Its AVI's audio is MP3, which starts before 0 by libmp3lame's encoder delay (576 samples)
# plus the 529 FFmpeg adds: the demo's audio starts with that much silence, and its frames come late.
DEMO_MP3_DELAY = 1105  # samples at the clip's audio rate


def demo_frame_indices(path: str, n_native: int) -> np.ndarray:
    """Faithful mode: the source frame behind each of the demo's 25-fps frames, as FFmpeg picks them.

    1. Into the AVI FFmpeg converts the rate the `vfr` way (its default for AVI): a frame that falls
       0.6 of an output frame or more behind is dropped; one that runs ahead takes its own slot.
    2. The MP3 starting before 0 makes the muxer delay every stream by ceil(delay x 25) frames, but an
       AVI's first frame is always its first chunk: every later frame comes that many frames late, the
       skipped slots left empty.
    3. Out of the AVI into images, `cfr`: an empty slot repeats the next frame (two or more: the one
       before too), a frame more than 1.1 frames late is dropped.
    Tests check the result against the demo's own `ffmpeg` commands."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        time_base, rate = stream.time_base, stream.guessed_rate or stream.average_rate
        start = container.start_time or 0
        packets = sorted((p.pts, p.duration or 0) for p in container.demux(stream) if p.pts is not None)
        audio_rate = container.streams.audio[0].rate if container.streams.audio else None
    fps = int(ASD_FPS)
    offset = _rescale(-start, Fraction(1, 1_000_000) / time_base)  # FFmpeg starts a file at its start time
    times = [_rescale(pts + offset, time_base * fps * 65536) / 65536 for pts, _ in packets]  # 16 extra bits
    fallback = min(float(fps / rate), 1.0) if rate else 0.0
    durations = [_round_half_even(float(d * time_base * fps)) or fallback for _, d in packets]
    delay = -(-DEMO_MP3_DELAY * fps // audio_rate) if audio_rate else 0
    slots, sources = [], []
    for source, (slot, _, copies) in enumerate(_ffmpeg_vsync(times, durations, cfr=False)):
        if copies:
            slots.append(max(slot + delay, slots[-1] + 1) if slots else 0)
            sources.append(source)
    out_of_avi = _ffmpeg_vsync([float(s) for s in slots], [1.0] * len(slots), cfr=True)
    indices, previous = [], sources[0] if sources else 0
    for source, (_, repeats, copies) in zip(sources, out_of_avi):
        indices += [previous] * repeats + [source] * (copies - repeats)
        previous = source if copies else previous
    recent = [0, 0, 0] + [repeats for _, repeats, _ in out_of_avi[-3:]]
    indices += [previous] * sorted(recent[-3:])[1]  # at the end FFmpeg repeats the last frame by the median of 3
    return np.minimum(np.array(indices, dtype=int), max(n_native - 1, 0))


def _ffmpeg_vsync(times: list[float], durations: list[float], cfr: bool) -> list[tuple[int, int, int]]:
    """FFmpeg's frame-rate conversion (fftools `do_video_out` / `video_sync_process`, methods `cfr` and
    `vfr`): for each input frame, at its time and duration in output frames, (its first output slot,
    copies of the frame before it, copies in all). `times` carry FFmpeg's 1/2^17 nudge away from halves."""
    out, next_slot = [], 0
    for time, duration in zip(times, durations):
        time += (1 if time > 0 else -1) / (1 << 17)
        drift = time - next_slot
        delta = drift + duration
        if drift < 0 < delta:  # a frame a little behind is clipped to the next slot
            time, drift = next_slot, 0.0
        repeats, copies = 0, 1
        if cfr:
            if delta < -1.1:
                copies = 0
            elif delta > 1.1:
                copies = _round_half_even(delta)
                repeats = _round_half_even(drift - 0.6) if drift > 1.1 else 0
        elif delta <= -0.6:
            copies = 0
        elif delta > 0.6:
            next_slot = _round_half_even(time)
        out.append((next_slot, repeats, copies))
        next_slot += copies
    return out


def _rescale(value: int, factor: Fraction) -> int:
    """`av_rescale_q`: value x factor rounded to the nearest integer, halves away from zero."""
    exact = value * factor
    return int(math.copysign(math.floor(abs(exact) + Fraction(1, 2)), exact))


def _round_half_even(x: float) -> int:
    return int(round(x))  # C's lrint / llrint in the default rounding mode


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
    indices = _frame_indices_25fps(n_native, native_fps)
    return reader.get_batch(indices.tolist()).asnumpy(), width / reader[0].shape[1]


def iter_full_frames(path: str, chunk: int = 32):
    """(first index, full-resolution RGB frames) at 25 fps as the demo's FFmpeg picks them (faithful
    mode reads only these), `chunk` frames at a time."""
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    indices = demo_frame_indices(path, len(reader))
    if not len(indices):  # no timestamps to follow FFmpeg by
        indices = _frame_indices_25fps(len(reader), float(reader.get_avg_fps()))
    for start in range(0, len(indices), chunk):
        yield start, reader.get_batch(indices[start : start + chunk].tolist()).asnumpy()


@dataclass
class ClipFrames:
    """What the speaker stage needs of a clip's video, all at 25 fps."""

    small: np.ndarray  # [n, h, w, 3] short side <= 360: tracks, `sync` and contact sheets are in these pixels
    scale: float  # small pixels -> full-resolution pixels
    cuts: list[int]  # first frame of every shot after the first
    detect: np.ndarray | None = None  # [n, h', w', 3] S3FD's input (faithful: 0.25 of the full frames)
    detect_to_small: float = 1.0  # detect pixels -> small pixels
    path: str | None = None  # faithful TalkNet crops read the full frames again from here


def read_clip_frames(path: str, faithful: bool = False, s3fd_scale: float | None = None) -> ClipFrames:
    """Frames and shot cuts. `fast`: decoded small (decoder-side scaling), cuts on the small frames.
    `faithful`: the full frames streamed once, giving the small copy, the cuts (on the full frames, as
    the demo) and, with `s3fd_scale`, S3FD's input at that scale of the full frames."""
    if not faithful:
        small, scale = read_small_frames(path)
        return ClipFrames(small, scale, shot_cuts(small))
    shots, small, detect = ShotCuts(ASD_FPS), [], []
    for _, frames in iter_full_frames(path):
        height, width = frames.shape[1:3]
        shrink = max(1.0, min(height, width) / SCORE_SHORT_SIDE)
        size = (int(round(width / shrink / 2) * 2), int(round(height / shrink / 2) * 2))
        shots.add(frames)
        small += [cv2.resize(f, size, interpolation=cv2.INTER_AREA) if shrink > 1.0 else f for f in frames]
        if s3fd_scale:
            detect += [cv2.resize(f, None, fx=s3fd_scale, fy=s3fd_scale, interpolation=cv2.INTER_LINEAR) for f in frames]
    small = np.stack(small)
    detect_frames = np.stack(detect) if detect else None
    to_small = small.shape[2] / detect_frames.shape[2] if detect else 1.0
    return ClipFrames(small, width / small.shape[2], shots.cuts(), detect_frames, to_small, path)


def detection_frames(clip: ClipFrames, faithful: bool, detect_every: int, s3fd: bool) -> tuple[np.ndarray, list[int], float]:
    """What a face detector sees of a clip: (frames, the 25-fps frame each one is, their pixels -> small
    pixels). Faithful: every frame (S3FD: its 0.25-scale copy of the full frames). Fast: every
    `detect_every`-th frame and the last (S3FD: at 0.5 of the small frames, ~0.25 of 720p)."""
    n = len(clip.small)
    chosen = list(range(n)) if faithful else [i for i in range(n) if i % detect_every == 0 or i == n - 1]
    if not s3fd:
        return clip.small[chosen], chosen, 1.0
    if faithful:
        return clip.detect, chosen, clip.detect_to_small
    half = np.stack([cv2.resize(clip.small[i], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_LINEAR) for i in chosen])
    return half, chosen, clip.small.shape[2] / half.shape[2]


def place_detections(n: int, chosen: list[int], found: list[np.ndarray], to_small: float) -> list[np.ndarray]:
    """Boxes per frame of the clip (small pixels); frames not looked at get none (tracks interpolate)."""
    out = [np.zeros((0, 4)) for _ in range(n)]
    for i, boxes in zip(chosen, found):
        out[i] = np.asarray(boxes, float).reshape(-1, 4) * to_small
    return out


def s3fd_faces(model, frame_sets: list[np.ndarray], frames_per_forward: int = S3FD_BATCH) -> list[list[np.ndarray]]:
    """S3FD boxes of every frame of several clips (each a [n, h, w, 3] stack, as the caller resized it),
    `frames_per_forward` frames of one size per forward, across clips."""
    from pipelines.asd.s3fd import detect_batch

    found: list[list[np.ndarray]] = [[np.zeros((0, 4))] * len(frames) for frames in frame_sets]
    by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for c, frames in enumerate(frame_sets):
        by_size.setdefault(frames.shape[1:3], []).extend((c, i) for i in range(len(frames)))
    for members in by_size.values():
        for start in range(0, len(members), frames_per_forward):
            part = members[start : start + frames_per_forward]
            for (c, i), boxes in zip(part, detect_batch(model, np.stack([frame_sets[c][i] for c, i in part]), scale=1.0)):
                found[c][i] = boxes
    return found


def haar_faces(frames: np.ndarray) -> list[np.ndarray]:
    return [detect_faces(frame) for frame in frames]


def tracks_from(detections: list[np.ndarray], faithful: bool, cuts: list[int] | tuple = ()) -> list[Track]:
    """Faithful: the demo's linking, tracks of more than 10 detected frames. Fast: tracks spanning 10 frames."""
    if faithful:
        return build_tracks(detections, min_length=MIN_TRACK, min_detections=MIN_TRACK, cuts=cuts, like_demo=True)
    return build_tracks(detections, min_length=min(MIN_TRACK, len(detections)), cuts=cuts)


def face_look(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A face's appearance in one frame: the mean colour of the middle of its box (eyes, nose, skin)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    patch = frame[int(max(0, y0 + h / 4)) : int(max(1, y1 - h / 4)), int(max(0, x0 + w / 4)) : int(max(1, x1 - w / 4))]
    return patch.reshape(-1, 3).mean(axis=0) if patch.size else np.zeros(3)


def track_looks(frames: np.ndarray, tracks: list[Track]) -> list[np.ndarray]:
    """A face's appearance per track: its look (`face_look`) averaged over the track."""
    step = lambda t: max(1, len(t) // 8)  # noqa: E731
    return [np.mean([face_look(frames[f], b) for f, b in zip(t.frames[:: step(t)], t.boxes[:: step(t)])], axis=0) for t in tracks]


LOOK_JUMP = 40.0  # sum over RGB of the change in a face's look that means another person


def look_cuts(frames: np.ndarray, detections: list[np.ndarray], cuts: list[int]) -> list[int]:
    """`cuts` plus the cuts a content detector misses and the faces show: between two looked-at frames,
    every face found at the same place in both looks like another person (a reverse shot over a similar
    backdrop: the two people swapped sides). The cut goes where consecutive frames differ most."""
    looked = [i for i, boxes in enumerate(detections) if len(boxes)]
    found = list(cuts)
    for a, b in zip(looked, looked[1:]):
        if any(a < c <= b for c in found):
            continue
        same_place = [(x, y) for x in detections[a] for y in detections[b] if iou(x, y) > 0.5]
        if same_place and all(np.abs(face_look(frames[a], x) - face_look(frames[b], y)).sum() > LOOK_JUMP for x, y in same_place):
            change = [np.abs(frames[f].astype(np.int16) - frames[f - 1]).mean() for f in range(a + 1, b + 1)]
            found.append(a + 1 + int(np.argmax(change)))
    return sorted(found)


def sync_scores(frames: np.ndarray, tracks: list[Track], audio_16k: np.ndarray) -> list[float]:
    """The `sync` score of every track against the clip's speech."""
    envelope = rms_per_frame(audio_16k, 16_000, ASD_FPS, len(frames))
    return [track_sync_score(frames[t.frames], t.boxes, envelope[t.frames]) for t in tracks]


# the demo's `durationSet = {1,1,1,2,2,2,3,3,4,5,6}` is a Python set: windows of 1..6 s, each once
TALKNET_WINDOWS_S = (1, 2, 3, 4, 5, 6)
TALKNET_THRESHOLD = 0.0  # a mean speaking logit above 0 means speaking
AUDIO_PER_FRAME = 16_000 // int(ASD_FPS)  # 640 samples per video frame
# frames per ResNet forward of TalkNet's visual front end (other devices: a whole track): on CPU 16 run
# ~1.2x faster per frame than 200 at once (1 thread) and bound memory on long tracks
TALKNET_FRAME_BATCH = {"cpu": 16}
TALKNET_WINDOW_BATCH = 64  # windows of equal length per forward after the front end (faster than 1 on CPU too)


def talknet_faces(chunks, tracks: list[Track], to_chunk_px: float = 1.0) -> list[np.ndarray]:
    """Each track's grey 112x112 face crops ([n, 112, 112] uint8) as the demo cuts them, from frames
    given as (first index, frames) chunks whose pixels are the tracks' x `to_chunk_px`."""
    from pipelines.asd.talknet import demo_crop_track, demo_face_crop, demo_grey_centre

    params = [demo_crop_track((t.raw_boxes if t.raw_boxes is not None else t.boxes) * to_chunk_px) for t in tracks]
    faces = [np.zeros((len(t), 112, 112), np.uint8) for t in tracks]
    for start, frames in chunks:
        for t, track in enumerate(tracks):
            first = track.frames[0]
            for f in range(max(first, start), min(track.frames[-1] + 1, start + len(frames))):
                x, y, s = params[t][f - first]
                faces[t][f - first] = demo_grey_centre(demo_face_crop(frames[f - start], x, y, s))
    return faces


def talknet_track_inputs(faces: np.ndarray, audio_16k: np.ndarray, first_frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(MFCC [4T, 13], faces [T, 112, 112]) of one track as the demo scores it: the MFCC of the track's
    own audio (int16 scale), both cut to the demo's common length."""
    from pipelines.asd.talknet import demo_length, mfcc_100fps

    audio = audio_16k[first_frame * AUDIO_PER_FRAME : (first_frame + len(faces)) * AUDIO_PER_FRAME]
    mfcc = mfcc_100fps(audio) if len(audio) >= 400 else np.zeros((0, 13), np.float32)
    n_audio, n_video = demo_length(len(mfcc), len(faces))
    return mfcc[:n_audio], faces[:n_video]


def talknet_frame_scores(inputs: list[tuple[np.ndarray, np.ndarray]], model, decimals: int | None = 1) -> list[np.ndarray]:
    """Per-frame speaking scores of each track as the demo's `evaluate_network` gives them: the mean over
    windows of 1..6 s, rounded to 0.1. The visual front end, most of TalkNet's work, runs once per track
    rather than once per window (`TalkNet.window_visual_features`, equal to float tolerance); the rest runs
    per window, `TALKNET_WINDOW_BATCH` windows of equal length per forward."""
    import torch

    from pipelines.asd.talknet import MFCC_PER_FRAME

    device = next(model.parameters()).device
    frame_batch = TALKNET_FRAME_BATCH.get(device.type)
    steps = [int(seconds * ASD_FPS) for seconds in TALKNET_WINDOWS_S]
    sums = [np.zeros(len(video), np.float64) for _, video in inputs]
    by_length: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    with torch.inference_mode():
        for t, (_, video) in enumerate(inputs):
            windows = [(start, min(start + step, len(video))) for step in steps for start in range(0, len(video), step)]
            if windows:
                visual = model.window_visual_features(torch.from_numpy(video).to(device, torch.float32), windows, frame_batch)
                for (start, end), features in zip(windows, visual):
                    by_length.setdefault(end - start, []).append((t, start, features))
        for length, group in by_length.items():
            for first in range(0, len(group), TALKNET_WINDOW_BATCH):
                part = group[first : first + TALKNET_WINDOW_BATCH]
                audio = np.stack([inputs[t][0][s * MFCC_PER_FRAME : (s + length) * MFCC_PER_FRAME] for t, s, _ in part])
                logits = model.forward_from_visual(torch.from_numpy(audio).to(device), torch.stack([f for _, _, f in part]))
                for (t, s, _), row in zip(part, logits.float().cpu().numpy()):
                    sums[t][s : s + length] += row
    means = [total / len(TALKNET_WINDOWS_S) for total in sums]
    return [np.round(m, decimals) for m in means] if decimals is not None else means


def choose_speaker(
    tracks: list[Track], scores: list[float] | None, scale: float, threshold: float = DEFAULT_THRESHOLD,
    method: str = "sync", cuts: list[int] | tuple = (), looks: list[np.ndarray] | None = None,
) -> SpeakerResult:
    """The track that best follows the speech, visible if its score passes `threshold`.

    Tracks are ranked by score x the share of the clip they cover: a correlation over a short track
    fragment (a face the detector lost for a while) is noisy and must not outrank a whole track.
    Without scores, the longest track is taken. With `cuts`, one track of every other shot is kept too
    (`other_shots`: after a cut the speaker is another track), the best-ranked; with `looks`
    (`track_looks`) faces are followed across shots by their looks and the face with the best score x
    frames over all its shots is the speaker (a correlation over one short shot is noisy).
    """
    if not tracks:
        return SpeakerResult("none", False, None, None, scale, 0)
    if scores is None:
        return SpeakerResult("largest_track", None, None, max(tracks, key=len), scale, len(tracks))
    longest = max(len(t) for t in tracks)
    coverage = [len(t) / longest for t in tracks]
    # sync scores are correlations (>= 0): shrink short fragments; TalkNet logits are ranked as they are
    rank = [s * c for s, c in zip(scores, coverage)] if method == "sync" else list(scores)
    order = [int(i) for i in np.argsort(rank)[::-1]]
    best = order[0]
    shot_of = [int(np.searchsorted(sorted(cuts), t.frames[0], side="right")) for t in tracks]
    shots = sorted(set(shot_of))
    if looks is not None and len(shots) > 1:
        # the speaker does not change at a cut: a face is followed across shots by its looks, and the
        # face whose tracks follow the speech best over the whole clip (score x frames) is the speaker
        def same_face(i: int) -> dict[int, int]:
            return {shot: min((j for j in range(len(tracks)) if shot_of[j] == shot), key=lambda j: np.abs(looks[j] - looks[i]).sum())
                    for shot in shots if shot != shot_of[i]}  # fmt: skip

        total = [scores[i] * len(tracks[i]) + sum(scores[j] * len(tracks[j]) for j in same_face(i).values()) for i in range(len(tracks))]
        best = int(np.argmax(total))
        others = same_face(best)
    else:
        others = {}  # tracks never cross a cut: the best track of every other shot is that shot's speaker
        for i in order:
            if shot_of[i] != shot_of[best]:
                others.setdefault(shot_of[i], i)
    return SpeakerResult(
        method, scores[best] >= threshold, float(scores[best]), tracks[best], scale, len(tracks), [tracks[i] for i in others.values()]
    )  # fmt: skip


# ---- the stage as steps: what passes between the job's Ray stages -------------------------------------
@dataclass
class SpeakerWork:
    """One clip inside the speaker stage. The steps fill it in order, each in whichever process runs it:

        start_speaker (CPU: frames, shots) -> faces (S3FD actors, or Haar in `track_speaker`)
        -> track_speaker (CPU: tracks within shots; `sync` decides here) -> score_with_talknet (TalkNet actors)

    `result` is set by the step that decides; the frames are dropped once no later step needs them."""

    clip: ClipFrames
    audio_16k: np.ndarray | None
    faithful: bool = False
    detect_every: int = 5
    threshold: float = DEFAULT_THRESHOLD
    keep_small: bool = False  # keep the small frames to the end (for saving the speaker's face track)
    detections: list[np.ndarray] | None = None  # per 25-fps frame, small-frame pixels
    tracks: list[Track] | None = None
    scores: list[float] | None = None  # per track, once scored
    talknet_inputs: list[tuple[np.ndarray, np.ndarray]] | None = None  # per track: (MFCC, faces)
    result: SpeakerResult | None = None


def start_speaker(
    path: str, audio_16k: np.ndarray | None, faithful: bool = False, detect_every: int = 5,
    threshold: float = DEFAULT_THRESHOLD, s3fd: bool = False, keep_small: bool = False,
) -> SpeakerWork:
    """Read the clip's frames and shot cuts (faithful with S3FD: its 0.25-scale input too)."""
    from pipelines.asd.s3fd import DEMO_SCALE

    clip = read_clip_frames(path, faithful, DEMO_SCALE if (faithful and s3fd) else None)
    return SpeakerWork(clip, audio_16k, faithful, detect_every, threshold, keep_small)


def s3fd_frames_per_forward(model) -> int:
    """Frames per S3FD forward: a batch on a GPU; one on a CPU, where batching only costs cache
    (`benchmarks/asd.py`: 16 frames per forward ran at 0.79x of frame by frame on 2 cores)."""
    return S3FD_BATCH if next(model.parameters()).is_cuda else 1


def s3fd_detections(works: list[SpeakerWork], model) -> None:
    """Faces of several clips by one S3FD model, frames of all of them batched together."""
    plans = [detection_frames(w.clip, w.faithful, w.detect_every, s3fd=True) for w in works]
    found = s3fd_faces(model, [frames for frames, _, _ in plans], s3fd_frames_per_forward(model))
    for work, (_, chosen, to_small), boxes in zip(works, plans, found):
        work.detections = place_detections(len(work.clip.small), chosen, boxes, to_small)
        work.clip.detect = None  # S3FD's input is no longer needed


def track_speaker(work: SpeakerWork, talknet: bool = False) -> None:
    """Faces (Haar, unless S3FD found them), tracks within shots, and then: without a face or speech the
    longest track; `sync` scores and the speaker; for TalkNet, each track's inputs as the demo cuts them."""
    clip = work.clip
    if work.detections is None:
        frames, chosen, _ = detection_frames(clip, work.faithful, work.detect_every, s3fd=False)
        work.detections = place_detections(len(clip.small), chosen, haar_faces(frames), 1.0)
    if not work.faithful:  # merg's own addition; faithful mode cuts shots as the demo does
        clip.cuts = look_cuts(clip.small, work.detections, clip.cuts)
    tracks = work.tracks = tracks_from(work.detections, work.faithful, clip.cuts)
    work.detections = None
    audio = work.audio_16k
    if not (tracks and audio is not None and np.any(audio)):
        work.result = choose_speaker(tracks, None, clip.scale)
    elif talknet:
        full = work.faithful and clip.path
        chunks = iter_full_frames(clip.path) if full else [(0, clip.small)]
        faces = talknet_faces(chunks, tracks, clip.scale if full else 1.0)
        work.talknet_inputs = [talknet_track_inputs(f, audio, t.frames[0]) for f, t in zip(faces, tracks)]
    else:
        looks = track_looks(clip.small, tracks) if clip.cuts else None
        work.scores = sync_scores(clip.small, tracks, audio)
        work.result = choose_speaker(tracks, work.scores, clip.scale, work.threshold, cuts=clip.cuts, looks=looks)
    if not work.keep_small:
        clip.small = clip.small[:0]  # later steps need the tracks, not the frames


def score_with_talknet(works: list[SpeakerWork], model) -> None:
    """TalkNet's scores for the tracks of several clips (windows batched across all of them) and each
    clip's speaker; clips already decided (no face or no speech) are left as they are."""
    pending = [w for w in works if w.result is None]
    inputs = [pair for w in pending for pair in w.talknet_inputs]
    frame_scores = iter(talknet_frame_scores(inputs, model))
    for work in pending:
        work.scores = [float(s.mean()) if s.size else float("-inf") for s in (next(frame_scores) for _ in work.talknet_inputs)]
        work.result = choose_speaker(work.tracks, work.scores, work.clip.scale, TALKNET_THRESHOLD, "talknet", work.clip.cuts)
        work.talknet_inputs = None


def speaker_for_clip(
    path: str,
    audio_16k: np.ndarray | None,
    threshold: float = DEFAULT_THRESHOLD,
    faithful: bool = False,
    detect_every: int = 5,
    talknet=None,
    s3fd=None,
) -> tuple[SpeakerResult, ClipFrames]:
    """The whole speaker stage on one clip, in this process (no Ray), with loaded models (or None)."""
    work = start_speaker(path, audio_16k, faithful, detect_every, threshold, s3fd is not None, keep_small=True)
    if s3fd is not None:
        s3fd_detections([work], s3fd)
    track_speaker(work, talknet is not None)
    if talknet is not None:
        score_with_talknet([work], talknet)
    return work.result, work.clip
