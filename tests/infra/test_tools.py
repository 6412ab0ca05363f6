"""`infra.tools.require_tool`: a tool must start, not just be on PATH."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.tools import ToolUnavailable, require_tool


def broken_tool(folder: Path, name: str) -> Path:
    """A fake `name` on PATH that dies the way a half-configured apt install does."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\necho '{name}: error while loading shared libraries: libblas.so.3: cannot open "
                    "shared object file: No such file or directory' >&2\nexit 127\n")  # fmt: skip
    tool.chmod(0o755)
    return tool


@pytest.mark.parametrize("name", ["ffmpeg", "espeak-ng"])
def test_a_tool_that_cannot_start_is_named_with_its_stderr_and_the_fix(tmp_path, monkeypatch, name):
    monkeypatch.setenv("PATH", f"{broken_tool(tmp_path / 'bin', name).parent}:/usr/bin:/bin")
    with pytest.raises(ToolUnavailable) as caught:
        require_tool(name)
    message = str(caught.value)
    assert message.startswith(f"{name} cannot run") and "libblas.so.3" in message
    assert f"dpkg --configure -a && sudo apt-get install --reinstall {name}" in message and "\n" not in message


def test_a_missing_tool_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolUnavailable, match="ffmpeg not found on PATH: install it"):
        require_tool("ffmpeg")
