"""Real speech for mini-MELD lines, spoken by espeak-ng with a voice per speaker and emotion."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np

from pipelines.media import rms_per_frame

_FEMALE = {"rachel", "monica", "phoebe", "emily", "janice", "carol", "susan", "mona", "amy", "julie"}
_MALE = {"ross", "chandler", "joey", "gunther", "mike", "richard", "paolo", "pete", "ben", "frank"}
_FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")
_MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")

# (pitch shift, words per minute, amplitude) per emotion; espeak-ng defaults are 50, 175, 100.
_PROSODY = {
    "neutral": (0, 170, 100), "joy": (10, 185, 120), "surprise": (18, 190, 125),
    "anger": (4, 195, 160), "sadness": (-12, 140, 75), "disgust": (-6, 160, 105),
    "fear": (14, 190, 95),
}  # fmt: skip


class SpeechUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Voice:
    variant: str  # espeak-ng voice variant, e.g. "f3"
    pitch: int  # 0..99
    rate: int  # words per minute
    amplitude: int  # 0..200


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def voice_for(speaker: str, emotion: str) -> Voice:
    """A speaker keeps one voice across clips; the emotion shifts its pitch, rate and loudness."""
    name = speaker.strip().split(" ")[0].lower()
    h = _stable_int(speaker)
    if name in _FEMALE or (name not in _MALE and h % 2):
        variant = _FEMALE_VARIANTS[h % len(_FEMALE_VARIANTS)]
    else:
        variant = _MALE_VARIANTS[h % len(_MALE_VARIANTS)]
    base_pitch = 40 + (h >> 8) % 20
    pitch_shift, rate, amplitude = _PROSODY.get(emotion, _PROSODY["neutral"])
    return Voice(variant, int(np.clip(base_pitch + pitch_shift, 0, 99)), rate, amplitude)


def speak(text: str, voice: Voice, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Synthesise `text`; returns (float32 mono samples in [-1, 1], sample rate).

    Lines that would run past `max_seconds` are spoken faster (up to 1.6x) before the caller cuts them.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable("espeak-ng not found: install it (apt-get install espeak-ng)")
    rate = voice.rate
    for _ in range(2):
        proc = subprocess.run(
            [exe, "--stdout", "-v", f"en-us+{voice.variant}", "-p", str(voice.pitch),
             "-s", str(rate), "-a", str(voice.amplitude)],
            input=text.replace("\n", " ").encode("utf-8"), capture_output=True, check=True,
        )  # fmt: skip
        with wave.open(io.BytesIO(proc.stdout)) as wav:
            sample_rate = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
        seconds = len(pcm) / sample_rate
        if max_seconds is None or seconds <= max_seconds or rate >= voice.rate * 1.6:
            break
        rate = int(min(voice.rate * 1.6, rate * seconds / max_seconds))
    return (pcm.astype(np.float32) / 32768.0), sample_rate


def loudness_per_frame(samples: np.ndarray, sample_rate: int, fps: float, n_frames: int) -> np.ndarray:
    """RMS loudness per video frame, scaled to [0, 1] by the clip's 95th percentile."""
    rms = rms_per_frame(samples, sample_rate, fps, n_frames)
    peak = np.percentile(rms, 95) if rms.any() else 0.0
    return np.clip(rms / peak, 0.0, 1.0) if peak > 0 else rms
