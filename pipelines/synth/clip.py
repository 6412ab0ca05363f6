"""Render one mini-MELD clip: espeak-ng speech plus one or two drawn faces, muxed to H.264 + AAC."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipelines.synth.face import draw_face, face_box, look_for
from pipelines.meld import Utterance
from pipelines.synth.speech import loudness_per_frame, speak, voice_for

RESOLUTIONS = ((640, 360), (480, 270), (854, 480), (512, 288))
FRAME_RATES = (24.0, 25.0, 30.0)
AUDIO_RATE = 48_000  # MELD's clips carry 48 kHz stereo AAC; the decoder must resample to 16 kHz mono.


@dataclass(frozen=True)
class ClipJob:
    line: Utterance
    out_path: Path
    seed: int
    min_duration: float = 0.5
    max_duration: float = 6.0
    two_face_prob: float = 0.5
    cut_prob: float = 0.0  # share of two-face clips rendered as shot / reverse shot with one cut
    render_fault: str | None = None  # "no_audio" | "short_clip" | "one_frame"


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A room-like backdrop: a wall gradient, a floor and a couple of pieces of furniture."""
    top, bottom = rng.integers(60, 200, 3), rng.integers(30, 150, 3)
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    canvas = ((1 - t) * top + t * bottom).astype(np.uint8).repeat(width, axis=1)
    floor_y = int(height * rng.uniform(0.75, 0.85))
    canvas[floor_y:] = rng.integers(40, 120, 3)
    for _ in range(2):
        x0, w = int(rng.uniform(0, width * 0.8)), int(rng.uniform(width * 0.1, width * 0.3))
        y0 = int(rng.uniform(height * 0.1, height * 0.5))
        cv2.rectangle(canvas, (x0, y0), (x0 + w, floor_y), tuple(int(c) for c in rng.integers(20, 220, 3)), -1)
    return canvas


def _write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())


def render_clip(job: ClipJob) -> dict[str, Any]:
    """Render `job` to `job.out_path`; returns its ground-truth record (faces, boxes, who speaks)."""
    line = job.line
    rng = _rng(job.seed, "clip", line.key)
    scene_rng = _rng(job.seed, "scene", line.split, line.dialogue_id)  # one room per dialogue
    width, height = RESOLUTIONS[int(scene_rng.integers(len(RESOLUTIONS)))]
    fps = FRAME_RATES[int(scene_rng.integers(len(FRAME_RATES)))]

    speech, sample_rate = speak(line.text, voice_for(line.speaker, line.emotion), job.max_duration - 0.4)
    lead, tail = rng.uniform(0.1, 0.35), rng.uniform(0.1, 0.3)
    duration = float(np.clip(lead + len(speech) / sample_rate + tail, job.min_duration, job.max_duration))
    if job.render_fault == "short_clip":
        duration = 0.2
    elif job.render_fault == "one_frame":
        duration = 1.0 / fps
    n_frames = max(1, int(round(duration * fps)))
    duration = n_frames / fps
    audio = np.zeros(int(round(duration * sample_rate)), dtype=np.float32)
    start = min(int(lead * sample_rate), len(audio))
    spoken = speech[: len(audio) - start]
    audio[start : start + len(spoken)] = spoken
    loudness = loudness_per_frame(audio, sample_rate, fps, n_frames)
    mouth = np.convolve(loudness, np.ones(2) / 2, mode="same")  # lips lag loudness a little

    two_faces = rng.random() < job.two_face_prob
    listener = f"listener-{line.split}-{line.dialogue_id}"
    speaker_slot = int(rng.integers(2)) if two_faces else 0
    slots = [0.3, 0.7] if two_faces else [float(rng.uniform(0.4, 0.6))]
    face_w = min(width * (0.22 if two_faces else 0.3), height * 0.5 / 1.35) * rng.uniform(0.85, 1.1)
    faces = []
    for slot, x_frac in enumerate(slots):
        faces.append(
            dict(
                speaking=slot == speaker_slot,
                identity=line.speaker if slot == speaker_slot else listener,
                look=look_for(line.speaker if slot == speaker_slot else listener),
                cx=x_frac * width, cy=height * rng.uniform(0.42, 0.52),
                amp=(rng.uniform(0.005, 0.025) * width, rng.uniform(0.005, 0.015) * height),
                freq=rng.uniform(0.2, 0.6), phase=rng.uniform(0, 2 * np.pi),
                blinks=set(rng.choice(n_frames, size=max(1, n_frames // 75), replace=False).tolist()),
                boxes=[],
            )  # fmt: skip
        )

    backdrop = _background(width, height, scene_rng)
    # shot / reverse shot: from frame `cut` on, the camera looks from the other side of the room (another
    # backdrop, the two faces swap sides); both shots last >= 15 frames, PySceneDetect's shortest scene
    cut_rng = _rng(job.seed, "cut", line.key)
    cut = None
    if two_faces and n_frames >= 40 and job.cut_prob > 0 and cut_rng.random() < job.cut_prob:
        cut = int(cut_rng.integers(int(n_frames * 0.35), int(n_frames * 0.65) + 1))
        reverse = _background(width, height, _rng(job.seed, "reverse", line.split, line.dialogue_id))
    cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "bgr24",
           "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="merg-synth-") as tmp:
        if job.render_fault != "no_audio":
            wav_path = Path(tmp) / "speech.wav"
            _write_wav(wav_path, audio, sample_rate)
            cmd += ["-i", str(wav_path), "-c:a", "aac", "-b:a", "96k", "-ar", str(AUDIO_RATE), "-ac", "2"]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                "-threads", "1", "-t", f"{duration:.4f}", "-fflags", "+bitexact",
                "-movflags", "+faststart", str(job.out_path)]  # fmt: skip
        job.out_path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        for i in range(n_frames):
            reversed_shot = cut is not None and i >= cut
            frame = (reverse if reversed_shot else backdrop).copy()
            t = i / fps
            for face in faces:
                home = width - face["cx"] if reversed_shot else face["cx"]
                cx = home + face["amp"][0] * np.sin(2 * np.pi * face["freq"] * t + face["phase"])
                cy = face["cy"] + face["amp"][1] * np.cos(2 * np.pi * face["freq"] * t + face["phase"])
                expression = line.emotion if face["speaking"] else "neutral"
                draw_face(frame, cx, cy, face_w, face["look"], expression,
                          float(mouth[i]) if face["speaking"] else 0.0, blink=i in face["blinks"])  # fmt: skip
                face["boxes"].append(face_box(cx, cy, face_w, face["look"]))
            proc.stdin.write(frame.tobytes())
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed for {line.key}: {proc.stderr.read().decode()[-500:]}")

    return dict(
        duration=round(duration, 4), fps=fps, width=width, height=height, n_frames=n_frames,
        has_audio=job.render_fault != "no_audio", speech_start=round(lead, 4),
        speech_end=round(lead + len(spoken) / sample_rate, 4),
        speaker_face=speaker_slot, cuts=[cut] if cut is not None else [],
        faces=[dict(identity=f["identity"], speaking=f["speaking"], boxes=f["boxes"]) for f in faces],
    )  # fmt: skip
