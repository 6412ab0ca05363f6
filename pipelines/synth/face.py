"""Drawn faces for mini-MELD clips: a look per speaker, an expression per emotion, a moving mouth.

The faces are drawn with the structure face detectors key on (dark brows and eyes over lighter
cheeks, a nose ridge, a mouth), so the active-speaker stage can find and track them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

_SKIN = ((188, 208, 241), (150, 180, 224), (120, 150, 200), (90, 120, 170), (70, 95, 140))  # BGR
_HAIR = ((30, 30, 35), (40, 60, 100), (60, 110, 170), (20, 20, 20), (90, 90, 95), (50, 80, 140))


@dataclass(frozen=True)
class Expression:
    brow_raise: float  # + up, in face heights
    brow_slant: float  # + inner ends down (anger), - inner ends up (sadness, fear)
    mouth_curve: float  # + smile, - frown
    eye_open: float  # 1 normal
    mouth_width: float  # 1 normal


EXPRESSIONS = {
    "neutral": Expression(0.0, 0.0, 0.0, 1.0, 1.0),
    "joy": Expression(0.02, 0.0, 0.7, 0.85, 1.15),
    "surprise": Expression(0.07, 0.0, 0.0, 1.45, 0.8),
    "anger": Expression(-0.02, 0.6, -0.25, 0.8, 0.95),
    "sadness": Expression(0.01, -0.55, -0.6, 0.8, 0.9),
    "disgust": Expression(-0.01, 0.3, -0.45, 0.7, 1.0),
    "fear": Expression(0.05, -0.45, -0.2, 1.4, 1.1),
}


@dataclass(frozen=True)
class Look:
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    aspect: float  # face height / width


def look_for(speaker: str) -> Look:
    h = int.from_bytes(hashlib.sha256(("look/" + speaker).encode()).digest()[:4], "little")
    return Look(_SKIN[h % len(_SKIN)], _HAIR[(h >> 4) % len(_HAIR)], 1.25 + ((h >> 8) % 10) / 100)


def face_box(cx: float, cy: float, width: float, look: Look) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1) around head and hair, as a face detector would report it."""
    height = width * look.aspect
    return (int(cx - width / 2), int(cy - height / 2), int(cx + width / 2), int(cy + height / 2))


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def draw_face(
    canvas: np.ndarray,
    cx: float,
    cy: float,
    width: float,
    look: Look,
    emotion: str,
    mouth_open: float,
    blink: bool = False,
) -> None:
    """Draw one face in place on a BGR canvas. `mouth_open` in [0, 1] follows the speech loudness."""
    expr = EXPRESSIONS.get(emotion, EXPRESSIONS["neutral"])
    w = width
    h = w * look.aspect
    aa = cv2.LINE_AA
    skin = np.array(look.skin, dtype=float)
    shade = tuple(int(c) for c in skin * 0.78)

    def pt(dx: float, dy: float) -> tuple[int, int]:  # offsets in face widths / heights
        return int(round(cx + dx * w)), int(round(cy + dy * h))

    # hair behind, head, ears, neck
    cv2.ellipse(canvas, pt(0, -0.06), (int(w * 0.56), int(h * 0.56)), 0, 0, 360, look.hair, -1, aa)
    cv2.rectangle(canvas, pt(-0.16, 0.35), pt(0.16, 0.62), shade, -1, aa)
    for side in (-1, 1):
        cv2.ellipse(canvas, pt(side * 0.47, 0.02), (int(w * 0.07), int(h * 0.09)), 0, 0, 360, shade, -1, aa)
    cv2.ellipse(canvas, pt(0, 0.04), (int(w * 0.46), int(h * 0.47)), 0, 0, 360, look.skin, -1, aa)
    # fringe
    cv2.ellipse(canvas, pt(0, -0.36), (int(w * 0.44), int(h * 0.16)), 0, 180, 360, look.hair, -1, aa)

    # eyes: dark sockets over lighter cheeks
    eye_y = -0.05
    eye_h = 0.045 * expr.eye_open * (0.15 if blink else 1.0)
    for side in (-1, 1):
        centre = pt(side * 0.19, eye_y)
        cv2.ellipse(canvas, centre, (int(w * 0.13), int(h * 0.075)), 0, 0, 360, shade, -1, aa)
        cv2.ellipse(canvas, centre, (int(w * 0.1), max(1, int(h * eye_h))), 0, 0, 360, (235, 235, 235), -1, aa)
        if not blink:
            cv2.circle(canvas, centre, max(1, int(w * 0.045)), (60, 40, 30), -1, aa)
            cv2.circle(canvas, centre, max(1, int(w * 0.02)), (10, 10, 10), -1, aa)

    # brows: raise and slant carry most of the emotion
    brow_y = eye_y - 0.085 - expr.brow_raise
    for side in (-1, 1):
        inner = pt(side * 0.07, brow_y + expr.brow_slant * 0.04)
        outer = pt(side * 0.31, brow_y - expr.brow_slant * 0.02)
        cv2.line(canvas, inner, outer, tuple(int(c * 0.6) for c in look.hair), max(2, int(w * 0.045)), aa)

    # nose ridge and shadow
    cv2.line(canvas, pt(0, -0.02), pt(0.015, 0.13), shade, max(1, int(w * 0.03)), aa)
    cv2.ellipse(canvas, pt(0, 0.15), (int(w * 0.07), int(h * 0.025)), 0, 0, 180, shade, -1, aa)

    # mouth: width and curve from the expression, opening from the loudness
    mouth_y = 0.28
    half = 0.16 * expr.mouth_width * _lerp(1.0, 0.8, mouth_open)
    curve = expr.mouth_curve * 0.05
    corners_y = mouth_y - curve
    opening = 0.012 + 0.12 * float(np.clip(mouth_open, 0.0, 1.0))
    xs = np.linspace(-half, half, 13)
    bend = 1 - (xs / half) ** 2  # 0 at the corners, 1 in the middle
    upper = [pt(x, corners_y + curve * b - opening * 0.35 * b) for x, b in zip(xs, bend)]
    lower = [pt(x, corners_y + curve * b + opening * b) for x, b in zip(xs[::-1], bend[::-1])]
    lips = np.array(upper + lower, dtype=np.int32)
    cv2.fillPoly(canvas, [lips], (40, 30, 110), aa)
    cv2.polylines(canvas, [lips], True, (50, 50, 150), max(1, int(w * 0.018)), aa)
