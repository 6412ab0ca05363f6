"""`infra/check_system.sh`, run by `infra/setup.sh` and `make demo` before anything else: tools must
start and heavy packages must import, each failure named with its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.infra.test_tools import broken_tool

BASH = shutil.which("bash")  # absolute: some tests hand the script a PATH without it
SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "check_system.sh"


def _check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_a_tool_that_cannot_start_fails_the_check_with_the_fix(tmp_path):
    fake = broken_tool(tmp_path / "bin", "ffmpeg").parent
    result = _check("tools", PATH=f"{fake}:/usr/bin:/bin")
    assert result.returncode == 1
    assert "ffmpeg cannot run" in result.stdout and "libblas.so.3" in result.stdout
    assert "sudo dpkg --configure -a && sudo apt-get install --reinstall ffmpeg" in result.stdout


def test_a_missing_tool_is_only_a_warning(tmp_path):
    (tmp_path / "bin").mkdir()
    result = _check("tools", PATH=str(tmp_path / "bin"))
    assert result.returncode == 0 and "WARNING: ffmpeg not found" in result.stdout and "espeak-ng not found" in result.stdout


def test_a_package_that_fails_to_import_is_named_with_the_fix(tmp_path):
    (tmp_path / "decord.py").write_text('raise ImportError("libavcodec.so.58: cannot open shared object file")\n')
    result = _check("imports", sys.executable, PYTHONPATH=str(tmp_path), MERG_CHECK_MODULES="json:json decord:decord")
    assert result.returncode == 1
    assert "python package decord does not import (decord): ImportError: libavcodec.so.58" in result.stdout
    assert "pip install --force-reinstall --no-deps decord" in result.stdout and "json" not in result.stdout
    ok = _check("imports", sys.executable, MERG_CHECK_MODULES="json:json")
    assert ok.returncode == 0 and ok.stdout == ""
