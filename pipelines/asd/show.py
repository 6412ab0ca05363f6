"""A contact sheet of one clip's active-speaker decision: frames with every track's box and score."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipelines.asd.stage import ASD_FPS, SpeakerResult, start_speaker, track_speaker
from pipelines.decode import read_audio_16k

_COLOURS = [(255, 170, 0), (0, 170, 255), (255, 0, 170), (170, 255, 0), (0, 255, 255)]  # RGB, one per track


def contact_sheet(clip: Path | str, out_png: Path | str, tiles: int = 8, columns: int = 4, detect_every: int = 5) -> SpeakerResult:
    """Render `tiles` frames of `clip` with all tracks (thin) and the chosen speaker (thick, green)."""
    work = start_speaker(str(clip), read_audio_16k(clip), detect_every=detect_every, keep_small=True)
    track_speaker(work)  # the job's steps: faces, tracks within shots, `sync` scores, the speaker
    frames, tracks, scores, result = work.clip.small, work.tracks, work.scores, work.result
    picks = np.linspace(0, len(frames) - 1, min(tiles, len(frames))).round().astype(int)
    sheet = []
    for index in picks:
        frame = np.ascontiguousarray(frames[index])
        for i, track in enumerate(tracks):
            if not track.frames[0] <= index <= track.frames[-1]:
                continue
            x0, y0, x1, y1 = track.boxes[index - track.frames[0]].astype(int)
            chosen = track is result.track
            colour = (0, 255, 0) if chosen else _COLOURS[i % len(_COLOURS)]
            cv2.rectangle(frame, (x0, y0), (x1, y1), colour, 4 if chosen else 1)
            label = f"#{i} {scores[i]:.2f}" if scores is not None else f"#{i}"
            cv2.putText(frame, label, (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
        cv2.putText(frame, f"t={index / ASD_FPS:.2f}s", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        sheet.append(frame)
    while len(sheet) % columns:
        sheet.append(np.zeros_like(sheet[0]))
    rows = [np.concatenate(sheet[i : i + columns], axis=1) for i in range(0, len(sheet), columns)]
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    return result
