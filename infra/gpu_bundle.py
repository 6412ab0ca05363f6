"""Bundle what a bare GPU machine lacks for `infra/gpu_check.sh`, within a 64 MiB transfer.

    .venv/bin/python infra/gpu_bundle.py [--python 3.12] [--out .gpu]

A lent GPU machine has no network and brings its own Python with torch, CUDA, numpy, pyarrow, pandas,
accelerate, tokenizers, safetensors, timm, einops, yaml, rich and typer (see the device notes). This
writes, under `--out` (git-ignored):
  site.tar.xz  merg's other packages for that Python, at the versions installed in this venv (the pinned
               ones): wheels from the package index (sdist-only ones built here), unpacked, with
               bitsandbytes cut to its CUDA 13 and CPU libraries, xz-compressed (~54 MiB);
  llm.tar.xz   the embedded LLM's config, tokenizer and chat template. Its weights (540 MB) do not fit
               the transfer: the check builds the same architecture at random init, for throughput;
  clips/       3 generated 720p clips (~1.8 MiB) for the check's CPU decode rate (benchmarks/decode.py).
Ray (79 MB) and decord do not fit either: the check times the GPU stages directly, not the Ray job.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Distributions merg imports on the GPU check's paths that the GPU image lacks. Its transformers (5.17
# seen) and huggingface-hub stay: ours (5.23, 8 MiB packed) would not fit beside lance (46 MiB packed).
BUNDLED = [
    "pylance", "lance-namespace", "lance-namespace-urllib3-client", "bitsandbytes", "deepspeed", "hjson",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "peft", "imagebind-unofficial", "iopath", "ftfy", "wcwidth",
    "scenedetect-headless", "platformdirs", "python_speech_features",  # the speaker stage (benchmarks/asd.py)
]  # fmt: skip
KEEP_BNB_LIBS = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_34_x86_64", "manylinux1_x86_64"]  # fmt: skip


def fetch_wheels(python: str, dest: Path) -> list[Path]:
    """One wheel per bundled distribution for `python`, at this venv's versions."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = []
    for name in BUNDLED:
        spec = f"{name}=={metadata.version(name)}"
        target = dest / name
        binary = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
                  "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(target), spec]  # fmt: skip
        if subprocess.run(binary, capture_output=True).returncode:  # sdist only (deepspeed, iopath): build here
            build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(target), spec]
            subprocess.run(build, check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
        (wheel,) = target.glob("*.whl")
        print(f"  {spec:<48} {wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
        wheels.append(wheel)
    return wheels


def unpack(wheels: list[Path], site: Path) -> None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for lib in (site / "bitsandbytes").glob("libbitsandbytes_*.so"):
        if not KEEP_BNB_LIBS.search(lib.name):
            lib.unlink()
    # merg itself runs from the source tree there; this makes `metadata.version("merg")` answer as it does here
    info = site / f"merg-{metadata.version('merg')}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: merg\nVersion: {metadata.version('merg')}\n")


def llm_files(archive: Path) -> None:
    from infra.config import PathsConfig
    from infra.models import EMBEDDED_LLM, resolve_llm

    folder = resolve_llm(EMBEDDED_LLM, PathsConfig().model_cache)
    with tarfile.open(archive, "w:xz") as tar:
        for path in sorted(folder.iterdir()):
            if path.suffix in (".json", ".jinja", ".txt", ".model"):
                tar.add(path, arcname=path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"wheels for Python {args.python}:")
        wheels = fetch_wheels(args.python, Path(tmp) / "wheels")
        site = Path(tmp) / "site"
        unpack(wheels, site)
        archive = args.out / "site.tar.xz"
        print(f"compressing {archive} (xz -9e on all cores, a few minutes) ...")
        tar = subprocess.Popen(["tar", "-C", str(site), "-cf", "-", "."], stdout=subprocess.PIPE)
        with archive.open("wb") as fh:
            subprocess.run(["xz", "-9e", "-T0"], stdin=tar.stdout, stdout=fh, check=True)
        if tar.wait():
            sys.exit("tar failed")
    (args.out / "python-version").write_text(args.python + "\n")  # the check unpacks site.tar.xz only for this Python
    llm_files(args.out / "llm.tar.xz")
    from benchmarks.decode import make_clips

    make_clips(args.out / "clips", 3)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB (the transfer limit is 64 MiB with the source tree)")


if __name__ == "__main__":
    main()
