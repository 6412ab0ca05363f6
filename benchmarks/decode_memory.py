"""Decode memory: what one clip's decode really takes (peak RSS) against what its task requests.

    .venv/bin/python benchmarks/decode_memory.py [--clips 3s-720p,20s-360p,20s-1080p]

Each clip is generated with ffmpeg's lavfi testsrc (and a sine tone), then decoded by
`pipelines.decode.decode_clip` in a fresh process, whose peak RSS is the figure (a Ray decode worker
holds the same imports). The request is `pipelines.job.decode_memory_request` for that clip; the
ratio request / peak must stay >= 1 (no worker runs past its reservation) and not far above it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines.job import decode_memory_request

_PEAK = (
    "import resource, sys; from pipelines.decode import decode_clip; clip = decode_clip('dev/dia0_utt0', sys.argv[1]);"
    "assert clip.failure is None, clip.failure; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
)
SIZES = {"360p": "640x360", "720p": "1280x720", "1080p": "1920x1080"}


def make_clip(folder: Path, spec: str) -> Path:
    seconds, size = spec.split("-")
    path = folder / f"{spec}.mp4"
    duration = float(seconds.rstrip("s"))
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error",
                    "-f", "lavfi", "-i", f"testsrc=size={SIZES[size]}:rate=25:duration={duration}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={duration}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(path)], check=True)  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default="3s-720p,20s-360p,20s-1080p", help="DURATIONs-SIZE, comma-separated")
    args = parser.parse_args()
    table = Table(title="decode memory per clip (GiB)")
    for column in ("clip", "peak RSS", "requested", "requested / peak"):
        table.add_column(column, justify="left" if column == "clip" else "right")
    with tempfile.TemporaryDirectory(prefix="merg-decode-memory-") as tmp:
        for spec in args.clips.split(","):
            clip = make_clip(Path(tmp), spec)
            peak = int(subprocess.run([sys.executable, "-c", _PEAK, str(clip)], capture_output=True, text=True,
                                      check=True).stdout.split()[-1])  # fmt: skip
            request = decode_memory_request(str(clip))
            table.add_row(spec, f"{peak / 1024**3:.2f}", f"{request / 1024**3:.1f}", f"{request / peak:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
