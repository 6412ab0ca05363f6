"""External programs merg runs (ffmpeg, espeak-ng): found on PATH *and* able to start.

A half-configured apt install leaves a binary on PATH that dies at start-up ("error while loading
shared libraries"); `require_tool` runs it once with its version flag and turns such a failure into
one line quoting the tool's own stderr and the fix.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache

VERSION_FLAGS = {"ffmpeg": "-version", "espeak-ng": "--version"}
APT_PACKAGES = {"ffmpeg": "ffmpeg", "espeak-ng": "espeak-ng"}


class ToolUnavailable(RuntimeError):
    """A program merg needs is missing or cannot run; the message says why and how to fix it."""


def require_tool(name: str) -> str:
    """The path of a working `name`, or ToolUnavailable naming the tool, its stderr and the fix."""
    exe = shutil.which(name)
    package = APT_PACKAGES.get(name, name)
    if exe is None:
        raise ToolUnavailable(f"{name} not found on PATH: install it (apt-get install {package}) or run `make install`")
    _check_runs(name, exe)
    return exe


@lru_cache(maxsize=None)  # per binary path: a PATH pointing elsewhere is checked again
def _check_runs(name: str, exe: str) -> None:
    flag = VERSION_FLAGS.get(name, "--version")
    package = APT_PACKAGES.get(name, name)
    fix = f"fix: sudo dpkg --configure -a && sudo apt-get install --reinstall {package}"
    try:
        proc = subprocess.run([exe, flag], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolUnavailable(f"{name} cannot run ({exe}: {exc}); {fix}") from exc
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()]
        why = "; ".join(lines[-3:]) or f"exit status {proc.returncode}, no output"
        raise ToolUnavailable(f"{name} cannot run (`{exe} {flag}` failed: {why}); {fix}")
