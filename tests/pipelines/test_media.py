"""The one path check that hashing, probing and decoding share (`pipelines.media.check_clip_path`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipelines.decode import decode_clip
from pipelines.job import _clip_sha256
from pipelines.media import check_clip_path, probe_clip


def _odd_paths(root: Path, good: Path) -> dict[str, Path]:
    """One path of each odd kind, keyed by the reason the check must give."""
    (root / "a_directory.mp4").mkdir()
    (root / "dangling.mp4").symlink_to(root / "nowhere.mp4")
    (root / "loop.mp4").symlink_to(root / "loop.mp4")
    os.mkfifo(root / "fifo.mp4")
    vanished = root / "vanished.mp4"
    shutil.copy(good, vanished)
    vanished.unlink()
    return {
        "is_directory": root / "a_directory.mp4", "dangling_link": root / "dangling.mp4",
        "link_loop": root / "loop.mp4", "not_regular_file": root / "fifo.mp4", "missing_file": vanished,
    }  # fmt: skip


def test_each_odd_path_has_its_reason_in_hashing_probing_and_decoding(tmp_path, mini_meld):
    good = next((mini_meld / "dev_splits_complete").glob("*.mp4"))
    assert check_clip_path(good) is None
    for reason, path in {**_odd_paths(tmp_path, good), "not_regular_file": Path("/dev/null")}.items():
        assert check_clip_path(path)[0] == reason, path
        assert _clip_sha256(path) is None  # never opened: a FIFO would block the hashing
        assert probe_clip(path).reason == reason
        decoded = decode_clip("dev/dia0_utt0", path)  # decoding goes through the probe: a reason, no exception
        assert decoded.failure[1] == reason and decoded.frames is None and decoded.audio is None


def test_unreadable_file_is_reported_not_raised(tmp_path):
    """Root reads any file, so as root the check runs with the effective uid of `nobody`."""
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"\0\0\0\x18ftypmp42")
    secret.chmod(0o000)
    if os.geteuid() != 0:
        assert check_clip_path(secret)[0] == "unreadable"
        return
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp folders are closed to other users
    try:
        folder.chmod(0o755)
        shutil.move(secret, folder / secret.name)
        os.seteuid(65534)
        try:
            found = check_clip_path(folder / secret.name)
        finally:
            os.seteuid(0)
        assert found[0] == "unreadable" and "Permission denied" in found[1]
    finally:
        shutil.rmtree(folder)


def test_a_file_that_is_not_an_mp4_is_named_without_copying_its_bytes(tmp_path):
    """issue 27 item 4: the reason says what the file is not; its first bytes never reach a failure record."""
    path = tmp_path / "dia0_utt0.mp4"
    path.write_bytes(b"vm\nprivate-host-name\n")
    probe = probe_clip(path)
    assert probe.reason == "not_mp4" and "vm" not in probe.detail and "private" not in probe.detail
