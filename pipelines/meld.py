"""Read MELD (real MELD.Raw or the generated mini-MELD, same layout) into typed utterance records.

Layout (either flat, or with each split's files under a `train/`, `dev/`, `test/` folder):

    train_sent_emo.csv   train_splits/diaD_uttU.mp4
    dev_sent_emo.csv     dev_splits_complete/diaD_uttU.mp4
    test_sent_emo.csv    output_repeated_splits_test/diaD_uttU.mp4

The copies of the CSVs inside the MELD.Raw archive show mojibake (`Â’`, `â€™`); the repository
copies are clean UTF-8. Both are repaired with ftfy so that they read the same. Every CSV row becomes
a record, whether or not its clip exists: `clip_status` says which, so nothing is dropped silently.
The root may be a folder or an object-storage URI (`s3://bucket/MELD.Raw`): there a clip folder is
listed once, and each clip's URI is its `clip_path`.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

import ftfy

from featurestore import storage
from featurestore.schema import SPLITS, utterance_key

log = logging.getLogger(__name__)

CSV_NAMES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
REQUIRED_COLUMNS = (
    "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
    "Season", "Episode", "StartTime", "EndTime",
)  # fmt: skip
CSV_COLUMNS = ("Sr No.",) + REQUIRED_COLUMNS

# Keep curly quotes (MELD's clean text has them); only undo encoding damage.
_FTFY = ftfy.TextFixerConfig(uncurl_quotes=False, fix_latin_ligatures=False, fix_character_width=False)
# `Â’` (Windows-1252 punctuation behind a stray `Â`) is too short for ftfy to be sure of in a short
# line such as "ThatÂ’s so Monica"; in English dialogue `Â` before such punctuation is always damage.
_CP1252_PUNCT = "".join(bytes([b]).decode("cp1252") for b in range(0x80, 0xA0) if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D))
_STRAY_A_CIRCUMFLEX = re.compile(f"Â([{re.escape(_CP1252_PUNCT)}])")


class MeldFormatError(ValueError):
    """A MELD CSV that cannot be read at all (missing file or required column)."""


@dataclass(frozen=True)
class Utterance:
    split: str
    dialogue_id: int
    utterance_id: int
    speaker: str
    text: str
    emotion: str
    sentiment: str
    season: int | None
    episode: int | None
    start_time: str
    end_time: str
    clip_path: Path | str | None  # a local path, or the clip's URI in object storage
    clip_status: str  # "found" | "missing" (CSV row, no file) | "no_media" (no clip folder at all)
    # | "outside_root" (a link out of the MELD root: refused, its path not kept)
    sr_no: int | None = None
    clip_detail: str = ""  # why the clip is refused
    clip_modified: datetime | None = None  # in object storage: when the clip was last written (UTC)

    @property
    def clip_failure(self) -> tuple[str, str] | None:
        """(reason, detail) when the clip is missing or refused before it is read, else None."""
        if self.clip_status == "missing":
            return "missing_file", "CSV row without a clip"
        if self.clip_status == "outside_root":
            return "outside_root", self.clip_detail
        return None

    @property
    def key(self) -> str:
        return utterance_key(self.split, self.dialogue_id, self.utterance_id)


@dataclass
class SplitReading:
    split: str
    csv_path: storage.Location
    clip_dir: storage.Location | None
    records: list[Utterance] = field(default_factory=list)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (CSV line number, reason)


def clip_filename(dialogue_id: int, utterance_id: int) -> str:
    return f"dia{dialogue_id}_utt{utterance_id}.mp4"


def fix_text(text: str) -> str:
    """Repair mojibake (`â€™` -> `’`, `Â’` -> `’`) and stray whitespace in a MELD text field."""
    return _STRAY_A_CIRCUMFLEX.sub(r"\1", ftfy.fix_text(text, _FTFY)).strip()


def _decode_csv(path: storage.Location) -> str:
    raw = storage.read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Some MELD copies are Windows-1252; ftfy repairs what this leaves behind.
        return raw.decode("cp1252", errors="replace")


def _find(root: storage.Location, split: str, name: str) -> storage.Location | None:
    for candidate in (storage.join(root, name), storage.join(root, split, name)):
        if storage.exists(candidate):
            return candidate
    return None


def _optional_int(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value else None


def read_split(root: storage.Location, split: str) -> SplitReading:
    """Read one split's CSV and locate its clips. Bad rows are reported in `bad_rows`, not raised."""
    from pipelines.media import outside_root  # on use, as in `summarize`: reading CSVs needs no OpenCV

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = storage.location(root)
    storage.check_access(root)  # object storage: a wrong key, bucket or endpoint fails here, in one line
    csv_path = _find(root, split, CSV_NAMES[split])
    if csv_path is None:
        raise MeldFormatError(f"{root}: no {CSV_NAMES[split]} (looked in {root} and {storage.join(root, split)})")
    clip_dir = _find(root, split, CLIP_DIRS[split])
    reading = SplitReading(split=split, csv_path=csv_path, clip_dir=clip_dir)
    listing = storage.list_dir(clip_dir) if clip_dir is not None and storage.is_uri(clip_dir) else None
    data_roots = (root, clip_dir) if clip_dir is not None else (root,)  # a linked clip folder is the data too

    reader = csv.DictReader(io.StringIO(_decode_csv(csv_path), newline=""))
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = [col for col in REQUIRED_COLUMNS if col not in header]
    if missing:
        raise MeldFormatError(f"{csv_path}: missing required column(s): {', '.join(missing)}")
    reader.fieldnames = header

    for row in reader:
        line = reader.line_num
        try:
            dialogue_id = int(row["Dialogue_ID"])
            utterance_id = int(row["Utterance_ID"])
            if row.get(None):
                raise ValueError(f"{len(row[None])} more fields than the header")
            clip_path, status, detail, modified = None, "no_media", "", None
            if listing is not None:  # object storage has no links to follow out of the root
                info = listing.get(clip_filename(dialogue_id, utterance_id))
                status = "found" if info is not None else "missing"
                clip_path = storage.join(clip_dir, clip_filename(dialogue_id, utterance_id)) if info is not None else None
                modified = info.mtime if info is not None else None
            elif clip_dir is not None:
                clip_path = clip_dir / clip_filename(dialogue_id, utterance_id)
                # a broken link is "found": the job records why it is unusable (dangling, looping)
                status = "found" if clip_path.exists() or clip_path.is_symlink() else "missing"
                if status == "found" and clip_path.is_symlink() and (refused := outside_root(clip_path, data_roots)):
                    status, detail = refused
                clip_path = clip_path if status == "found" else None
            reading.records.append(
                Utterance(
                    split=split,
                    dialogue_id=dialogue_id,
                    utterance_id=utterance_id,
                    speaker=fix_text(row["Speaker"]),
                    text=fix_text(row["Utterance"]),
                    emotion=row["Emotion"].strip().lower(),
                    sentiment=row["Sentiment"].strip().lower(),
                    season=_optional_int(row["Season"]),
                    episode=_optional_int(row["Episode"]),
                    start_time=row["StartTime"].strip(),
                    end_time=row["EndTime"].strip(),
                    clip_path=clip_path,
                    clip_status=status,
                    sr_no=_optional_int(row.get("Sr No.")),
                    clip_detail=detail,
                    clip_modified=modified,
                )
            )
        except (TypeError, ValueError) as exc:
            reading.bad_rows.append((line, f"{type(exc).__name__}: {exc}"))

    keys = Counter(r.key for r in reading.records)
    if dupes := [k for k, n in keys.items() if n > 1]:
        log.warning("%s: %d duplicate keys, e.g. %s", csv_path, len(dupes), dupes[0])
    missing_clips = sum(r.clip_status == "missing" for r in reading.records)
    if missing_clips:
        log.warning("%s: %d rows have no clip in %s", split, missing_clips, clip_dir)
    for line, reason in reading.bad_rows:
        log.warning("%s line %d skipped: %s", csv_path, line, reason)
    return reading


def read_splits(root: storage.Location, splits: Iterable[str] = SPLITS) -> dict[str, SplitReading]:
    """Read several splits; a split whose CSV is absent is an error naming the file."""
    return {split: read_split(root, split) for split in splits}


def _probe(path: storage.Location):
    """`probe_clip` of a local clip, or of a temp copy of one in object storage."""
    from pipelines.media import ClipProbe, probe_clip

    try:
        with storage.local_copy(path) as local:
            return probe_clip(local)
    except (FileNotFoundError, storage.StorageError) as exc:  # an object gone since the listing, or refused
        return ClipProbe(False, "unreadable", f"{path}: {exc}"[:500])


@dataclass
class MeldSummary:
    """Counts per split x emotion and the state of every clip (found / missing / faulty)."""

    emotions: dict[str, Counter]  # split -> emotion -> utterances
    clips: dict[str, Counter]  # split -> "ok" | "missing" | "faulty" | "no_media" -> clips
    problems: list[tuple[str, str, str]]  # (key, reason, detail), sorted by key
    bad_rows: list[tuple[str, int, str]]  # (csv file, line, reason)


def summarize(readings: dict[str, SplitReading], probe: bool = True, workers: int = 4) -> MeldSummary:
    """Summarise readings; with `probe`, every found clip is checked with `probe_clip` (in threads)."""
    from concurrent.futures import ThreadPoolExecutor

    records = [r for reading in readings.values() for r in reading.records]
    found = [r for r in records if r.clip_status == "found"]
    probes = {}
    if probe and found:
        with ThreadPoolExecutor(workers) as pool:
            probes = dict(zip((r.key for r in found), pool.map(_probe, (r.clip_path for r in found))))

    emotions = {split: Counter() for split in readings}
    clips = {split: Counter() for split in readings}
    problems = []
    for r in records:
        emotions[r.split][r.emotion] += 1
        state = r.clip_status
        if state == "found":
            result = probes.get(r.key)
            state = "faulty" if result is not None and not result.ok else "ok"
            if state == "faulty":
                problems.append((r.key, result.reason, result.detail))
        elif r.clip_failure is not None:
            problems.append((r.key, *r.clip_failure))
            state = "missing" if state == "missing" else "faulty"
        clips[r.split][state] += 1
    bad_rows = [(str(rd.csv_path), line, why) for rd in readings.values() for line, why in rd.bad_rows]
    return MeldSummary(emotions, clips, sorted(problems), bad_rows)
