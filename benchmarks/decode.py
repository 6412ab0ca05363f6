"""CPU decode rate on all cores: every frame of MELD-sized clips, as the faithful speaker stage needs them.

    .venv/bin/python benchmarks/decode.py [--clips DIR] [--seconds 10] [--json OUT.json]
    .venv/bin/python benchmarks/decode.py --make-clips DIR [--count 6]

The faithful job decodes every frame of every clip (S3FD looks at each one), so its CPU side costs
about one full H.264 decode per frame. This times that with OpenCV (FFmpeg's decoder inside; the GPU
image has it, while PyAV and decord, which the job itself uses, do not travel to that machine), one
process per core, for at least `--seconds`: frames/s and clips/s. It is a proxy for the job's decode
tasks (which also read the audio and crop frames): the GPU check's estimate of full MELD says so.

`--make-clips` writes `--count` clips of 3.6 s (MELD's mean: 13.7 h over 13,708 clips) of FFmpeg's
test pattern at 1280x720, 25 fps, with film grain (a flat pattern decodes far cheaper than filmed
frames): small enough to travel with the GPU check's bundle. Real MELD clips may decode slower or
faster: a proxy, and the estimate says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

GRAIN, CRF = 4, 28  # about 1.3 Mbit/s at 720p: a plausible rate for TV clips (MELD's own was not measured here)


def make_clips(out: Path, count: int, seconds: float = 3.6) -> list[Path]:
    """`count` clips of FFmpeg's moving test pattern with film grain, 1280x720 at 25 fps, H.264."""
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        # grain: a flat pattern would compress (and decode) far cheaper than filmed frames
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size=1280x720:rate=25:duration={seconds}", "-vf", f"noise=alls={GRAIN}:allf=t+u:all_seed={index}",
                        "-c:v", "libx264", "-crf", str(CRF), "-pix_fmt", "yuv420p", str(out / f"clip{index}.mp4")], check=True)  # fmt: skip
    return sorted(out.glob("*.mp4"))


def decode_all_frames(path: str) -> int:
    import cv2

    cv2.setNumThreads(1)  # one process per core
    capture = cv2.VideoCapture(path)
    frames = 0
    while capture.grab() and capture.retrieve()[0]:
        frames += 1
    capture.release()
    return frames


def measure(clips: list[Path], workers: int, seconds: float) -> dict:
    """Decode the clips over and over on `workers` processes for at least `seconds`."""
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(decode_all_frames, map(str, clips[:workers])))  # warm-up: start the workers
        frames = clips_done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            counts = list(pool.map(decode_all_frames, [str(c) for c in clips] * max(1, 2 * workers // len(clips))))
            frames, clips_done = frames + sum(counts), clips_done + len(counts)
        elapsed = time.perf_counter() - start
    if not frames:
        raise RuntimeError(f"OpenCV decoded no frames from {clips[0]}: is its FFmpeg backend there?")
    return {"frames_per_s": frames / elapsed, "clips_per_s": clips_done / elapsed, "frames_per_clip": frames / clips_done,
            "workers": workers, "decoder": "OpenCV's FFmpeg H.264, 1280x720 test-pattern clips with grain"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, help="folder of .mp4 clips (default: make some in a temp folder)")
    parser.add_argument("--make-clips", type=Path, help="only write clips to this folder")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--clip-seconds", type=float, default=3.6, help="length of each made clip")
    parser.add_argument("--seconds", type=float, default=10.0, help="least time spent decoding")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.make_clips:
        clips = make_clips(args.make_clips, args.count, args.clip_seconds)
        print(f"{len(clips)} clips, {sum(c.stat().st_size for c in clips) / 2**20:.1f} MiB, in {args.make_clips}")
        return
    work = None if args.clips else Path(tempfile.mkdtemp(prefix="merg-bench-decode-"))
    try:
        clips = sorted((args.clips or work).glob("*.mp4")) if args.clips else make_clips(work, args.count, args.clip_seconds)
        if not clips:
            sys.exit(f"no .mp4 clips in {args.clips}")
        result = measure(clips, args.workers, args.seconds)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"CPU decode, {result['workers']} processes: {result['frames_per_s']:,.0f} frames/s, "
          f"{result['clips_per_s']:.1f} clips/s ({result['frames_per_clip']:.0f} frames per clip; {result['decoder']})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
