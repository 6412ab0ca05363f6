"""Shot boundaries, as TalkNet's demo finds them: PySceneDetect's `ContentDetector` with its defaults.

The demo (demoTalkNet.py `scene_detect`) runs `ContentDetector()` (threshold 27, shots of at least
15 frames) on the 25 fps video downscaled by SceneManager's automatic factor, then tracks faces shot
by shot, so a track never crosses a cut. Here the same detector is fed decoded frames one by one,
downscaled the way SceneManager does (width / 256, bilinear), so no second decode of the clip is needed.
merg installs `scenedetect-headless` (the variant built on `opencv-python-headless`: one cv2 in the venv).
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

SCENE_MIN_WIDTH = 256  # scenedetect.scene_manager.DEFAULT_MIN_WIDTH: frames are downscaled to about this


def scene_frame(frame_rgb: np.ndarray) -> np.ndarray:
    """A frame as SceneManager hands it to its detectors: BGR, downscaled by width / 256 when wider."""
    height, width = frame_rgb.shape[:2]
    bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
    factor = width / SCENE_MIN_WIDTH
    if factor <= 1.0:
        return bgr
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)


class ShotCuts:
    """Feed frames in order (`add`), then `cuts()`: the first frame of every shot after the first."""

    def __init__(self, fps: float = 25.0):
        from scenedetect.detectors import ContentDetector

        self.fps = fps
        self.detector = ContentDetector()
        self.n = 0
        self.found: list[int] = []

    def add(self, frames_rgb: Iterable[np.ndarray]) -> None:
        from scenedetect import FrameTimecode

        for frame in frames_rgb:
            self.found += [c.frame_num for c in self.detector.process_frame(FrameTimecode(self.n, self.fps), scene_frame(frame))]
            self.n += 1

    def cuts(self) -> list[int]:
        from scenedetect import FrameTimecode

        if self.n:
            self.found += [c.frame_num for c in self.detector.post_process(FrameTimecode(self.n - 1, self.fps))]
        return sorted({c for c in self.found if 0 < c < self.n})


def shot_cuts(frames_rgb: Iterable[np.ndarray], fps: float = 25.0) -> list[int]:
    """Cuts in a sequence of frames (see `ShotCuts`)."""
    shots = ShotCuts(fps)
    shots.add(frames_rgb)
    return shots.cuts()
