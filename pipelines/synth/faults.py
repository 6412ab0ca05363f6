"""The failures real MELD data has, injected on purpose by `merg data synth --faults`.

Each fault names what the reader (and `probe_clip`) must report for it, so tests can check that
every injected fault is found.
"""

from __future__ import annotations

import random

import ftfy.bad_codecs  # noqa: F401  registers the 'sloppy-windows-1252' codec
from pathlib import Path

from pipelines.meld import Utterance

# fault -> what the reader reports: a clip_status ("missing"), a probe reason, or "text_repaired".
EXPECTED = {
    "missing_clip": "missing",
    "empty_clip": "empty_file",
    "truncated_clip": "truncated",
    "no_audio": "no_audio_stream",
    "not_a_video": "not_mp4",
    "short_clip": "too_short",
    "one_frame": "too_few_frames",
    "mojibake_cp1252": "text_repaired",
    "mojibake_double": "text_repaired",
    "quotes_commas_newline": "text_repaired",
}
RENDER_FAULTS = {"no_audio", "short_clip", "one_frame"}  # made while rendering the clip
TEXT_FAULTS = {"mojibake_cp1252", "mojibake_double", "quotes_commas_newline"}  # made in the CSV


def mojibake_cp1252(text: str) -> str:
    """UTF-8 bytes read as Windows-1252: `’` becomes `â€™` (seen in MELD.Raw's CSVs)."""
    return text.encode("utf-8").decode("sloppy-windows-1252")


def mojibake_double(text: str) -> str:
    """Windows-1252 read as Latin-1, re-encoded and read as Windows-1252: `’` becomes `Â’`."""
    return text.encode("cp1252").decode("latin-1").encode("utf-8").decode("sloppy-windows-1252")


def assign_faults(lines: list[Utterance], seed: int) -> dict[str, str]:
    """Pick one distinct utterance per fault (deterministic); returns key -> fault.

    Mojibake faults go to lines with an apostrophe, so there is something to damage.
    """
    rng = random.Random(f"{seed}/faults")
    keys = [line.key for line in lines]
    with_apostrophe = [line.key for line in lines if "’" in line.text or "'" in line.text]
    chosen: dict[str, str] = {}
    for fault in ("mojibake_cp1252", "mojibake_double"):
        free = [k for k in with_apostrophe if k not in chosen]
        if free:
            chosen[rng.choice(free)] = fault
    for fault in EXPECTED:
        if fault in chosen.values():
            continue
        free = [k for k in keys if k not in chosen]
        if not free:
            break
        chosen[rng.choice(free)] = fault
    return chosen


def damage_text(clean: str, fault: str) -> tuple[str, str]:
    """Returns (text the reader must produce, text written to the CSV) for a text fault."""
    if fault == "quotes_commas_newline":
        clean = f'"{clean}", she said, and then,\nquietly: "okay."'
        return clean, clean
    clean = clean.replace("'", "’")
    if fault == "mojibake_cp1252":
        return clean, mojibake_cp1252(clean)
    return clean, mojibake_double(clean)


def damage_file(path: Path, fault: str) -> None:
    """Apply a file-level fault to a rendered clip."""
    if fault == "missing_clip":
        path.unlink(missing_ok=True)
    elif fault == "empty_clip":
        path.write_bytes(b"")
    elif fault == "truncated_clip":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.45)])
    elif fault == "not_a_video":
        path.write_text("This is not a video. It is a text file that happens to end in .mp4.\n")
