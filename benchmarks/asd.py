"""Active-speaker benchmark: does the stage find the face that speaks, and how fast?

    .venv/bin/python benchmarks/asd.py [--dialogues 20] [--meld-root DIR]

On a generated mini-MELD (the sidecar says which face speaks and where it is), per scorer: speaker
accuracy on two-face clips (goal for `sync`: >= 95%), face-visible precision (the flagged track is
the speaker) and recall (every generated clip shows its speaker), and seconds of processing per
second of video for reading frames, detection, tracking and scoring. The baseline row is the
placeholder the stage replaced: the largest face on the middle frame. Last, TalkNet's scoring time
with windows batched across tracks against track by track (no TalkNet accuracy row: that needs the
real checkpoint).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from infra.config import SynthConfig
from pipelines.asd.stage import choose_speaker, detect_every_kth, detect_faces, read_small_frames, sync_scores, talknet_scores
from pipelines.asd.tracking import build_tracks
from pipelines.decode import read_audio_16k
from pipelines.synth import generate, read_ground_truth


def _hit(box: np.ndarray | None, truth: dict, scale: float) -> bool:
    if box is None:
        return False
    cx, cy = (box[0] + box[2]) / 2 * scale, (box[1] + box[3]) / 2 * scale
    x0, y0, x1, y1 = truth["faces"][truth["speaker_face"]]["boxes"][truth["n_frames"] // 2]
    return x0 <= cx <= x1 and y0 <= cy <= y1


def _talknet_timing(root: Path, truths: list[dict]) -> Table:
    """TalkNet scoring time, windows batched across tracks vs track by track (random weights: timing only)."""
    from pipelines.asd.talknet import TalkNet

    model = TalkNet().eval()
    batched = per_track = video_s = 0.0
    for t in truths:
        path = str(root / t["clip"])
        frames, _ = read_small_frames(path)
        audio = read_audio_16k(path)
        tracks = build_tracks(detect_every_kth(frames), min_length=min(10, len(frames)))
        if not tracks:
            continue
        video_s += t["duration"]
        start = time.perf_counter()
        talknet_scores(frames, tracks, audio, model)
        batched += time.perf_counter() - start
        start = time.perf_counter()
        for track in tracks:
            talknet_scores(frames, [track], audio, model)
        per_track += time.perf_counter() - start
    table = Table(title=f"TalkNet scoring on {len(truths)} two-face clips (random weights: timing only)")
    for column in ("way", "s / s of video", "speed-up over track by track"):
        table.add_column(column, justify="left" if column == "way" else "right")
    table.add_row("windows batched across tracks", f"{batched / video_s:.3f}", f"{per_track / batched:.2f}x")
    table.add_row("track by track", f"{per_track / video_s:.3f}", "1.00x")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=int, default=20)
    parser.add_argument("--meld-root", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merg-bench-asd-"))
    try:
        root = args.meld_root or work / "mini-meld"
        if args.meld_root is None:
            generate(SynthConfig(out=root, dialogues=args.dialogues, seed=1, two_face_prob=0.7))
        truths = [t for t in read_ground_truth(root).values() if t["fault"] is None]
        seconds = dict(read=0.0, detect=0.0, track=0.0, score=0.0)
        video_s = sum(t["duration"] for t in truths)
        results = {"sync": [], "largest face, middle frame": []}
        for t in truths:
            path = str(root / t["clip"])
            start = time.perf_counter()
            frames, scale = read_small_frames(path)
            audio = read_audio_16k(path)
            seconds["read"] += time.perf_counter() - start
            start = time.perf_counter()
            detections = detect_every_kth(frames)
            seconds["detect"] += time.perf_counter() - start
            start = time.perf_counter()
            tracks = build_tracks(detections, min_length=min(10, len(frames)))
            seconds["track"] += time.perf_counter() - start
            start = time.perf_counter()
            scores = sync_scores(frames, tracks, audio) if tracks else None
            result = choose_speaker(tracks, scores, scale)
            seconds["score"] += time.perf_counter() - start
            middle = result.box_at(t["duration"] / 2)
            results["sync"].append((len(t["faces"]), bool(result.face_visible), _hit(middle, t, 1.0)))
            faces = detect_faces(frames[len(frames) // 2])
            largest = max(faces, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) if len(faces) else None
            results["largest face, middle frame"].append((len(t["faces"]), largest is not None, _hit(largest, t, scale)))
        table = Table(title=f"active speaker detection on {len(truths)} generated clips ({video_s:.0f} s of video)")
        for column in ("scorer", "speaker accuracy, two-face clips", "face-visible precision", "face-visible recall", "goal"):
            table.add_column(column, justify="left" if column == "scorer" else "right")
        for name, rows in results.items():
            two = [hit for n, _, hit in rows if n == 2]
            flagged = [hit for _, visible, hit in rows if visible]
            table.add_row(
                name, f"{np.mean(two):.1%} of {len(two)}", f"{np.mean(flagged) if flagged else 0:.1%}",
                f"{len(flagged) / len(rows):.1%}", ">= 95% accuracy" if name == "sync" else "baseline",
            )  # fmt: skip
        Console(width=140).print(table)
        speed = Table(title="processing time per second of video (1 CPU core)")
        speed.add_column("step")
        speed.add_column("s / s of video", justify="right")
        for step, value in seconds.items():
            speed.add_row(step, f"{value / video_s:.3f}")
        speed.add_row("total", f"{sum(seconds.values()) / video_s:.3f}")
        Console(width=140).print(speed)
        Console(width=140).print(_talknet_timing(root, [t for t in truths if len(t["faces"]) == 2][:10]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
