"""mini-MELD: a generated dataset in the exact MELD.Raw layout, for running merg without real clips.

    generate(SynthConfig(out=..., dialogues=40, seed=0, faults=True), meld_text=...)

writes `{train,dev,test}_sent_emo.csv`, the clip folders (`train_splits/`, `dev_splits_complete/`,
`output_repeated_splits_test/`) and a sidecar `ground_truth.jsonl` (not part of MELD) recording per
clip which face speaks, the face boxes per frame and any injected fault.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

from featurestore.schema import SPLITS
from infra.config import SynthConfig
from infra.progress import progress_bar
from infra.tools import require_tool
from pipelines.meld import CLIP_DIRS, CSV_COLUMNS, CSV_NAMES, Utterance, clip_filename
from pipelines.synth.clip import ClipJob, render_clip
from pipelines.synth.faults import EXPECTED, RENDER_FAULTS, TEXT_FAULTS, assign_faults, damage_file, damage_text
from pipelines.synth.script import dialogues_per_split, script_from_bank, script_from_meld_text

log = logging.getLogger(__name__)

GROUND_TRUTH = "ground_truth.jsonl"


@dataclass
class SynthReport:
    out: Path
    source: str  # "meld-text:<dir>" or "bank"
    utterances: dict[str, int]
    dialogues: dict[str, int]
    clips_rendered: int
    faults: dict[str, str] = field(default_factory=dict)  # key -> fault
    seconds: float = 0.0


def write_csv(path: Path, lines: list[Utterance], csv_text: dict[str, str]) -> None:
    """Write one split's CSV exactly as MELD does (same columns, order and quoting)."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for sr_no, line in enumerate(lines, start=1):
            writer.writerow([
                sr_no, csv_text.get(line.key, line.text), line.speaker, line.emotion, line.sentiment,
                line.dialogue_id, line.utterance_id, line.season, line.episode, line.start_time, line.end_time,
            ])  # fmt: skip


def generate(config: SynthConfig, meld_text: Path | None = None) -> SynthReport:
    """Generate a mini-MELD under `config.out`. Deterministic for a given config."""
    started = time.perf_counter()
    for tool in ("ffmpeg", "espeak-ng"):  # both must start, not just be on PATH: fail before any work
        require_tool(tool)
    counts = dialogues_per_split(config.dialogues, config.split_fractions)
    text_dir = None if config.use_bank else (config.text_from or meld_text)
    if text_dir is not None and not (Path(text_dir) / CSV_NAMES["train"]).is_file():
        raise FileNotFoundError(f"--text-from {text_dir}: no {CSV_NAMES['train']} there")
    if text_dir is not None:
        lines, source = script_from_meld_text(Path(text_dir), counts, config.seed), f"meld-text:{text_dir}"
    else:
        lines, source = script_from_bank(counts, config.seed), "bank"

    faults = assign_faults(lines, config.seed) if config.faults else {}
    clean_text: dict[str, str] = {}
    csv_text: dict[str, str] = {}
    for i, line in enumerate(lines):
        if faults.get(line.key) in TEXT_FAULTS:
            clean_text[line.key], csv_text[line.key] = damage_text(line.text, faults[line.key])
            lines[i] = replace(line, text=clean_text[line.key])  # speak the clean text

    out = Path(config.out)
    for split in SPLITS:
        (out / CLIP_DIRS[split]).mkdir(parents=True, exist_ok=True)
    jobs = [
        ClipJob(
            line=line, out_path=out / CLIP_DIRS[line.split] / clip_filename(line.dialogue_id, line.utterance_id), seed=config.seed,
            min_duration=config.min_duration, max_duration=config.max_duration,
            two_face_prob=config.two_face_prob, cut_prob=config.cut_prob,
            render_fault=faults.get(line.key) if faults.get(line.key) in RENDER_FAULTS else None,
        )  # fmt: skip
        for line in lines
    ]

    truth: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=config.workers) as pool, progress_bar("rendering clips", len(jobs)) as advance:
        futures = {pool.submit(render_clip, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            truth[job.line.key] = future.result()
            advance()

    for key, fault in faults.items():
        if fault not in RENDER_FAULTS | TEXT_FAULTS:
            damage_file(next(j.out_path for j in jobs if j.line.key == key), fault)

    for split in SPLITS:
        write_csv(out / CSV_NAMES[split], [l for l in lines if l.split == split], csv_text)
    with (out / GROUND_TRUTH).open("w", encoding="utf-8") as fh:
        for job in jobs:
            line = job.line
            record = dict(
                key=line.key, split=line.split, dialogue_id=line.dialogue_id, utterance_id=line.utterance_id,
                speaker=line.speaker, text=line.text, emotion=line.emotion, sentiment=line.sentiment,
                clip=str(job.out_path.relative_to(out)), fault=faults.get(line.key),
                expect=EXPECTED.get(faults.get(line.key)), **truth[line.key],
            )  # fmt: skip
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    return SynthReport(
        out=out, source=source,
        utterances={s: sum(l.split == s for l in lines) for s in SPLITS},
        dialogues=counts, clips_rendered=len(jobs), faults=faults,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def read_ground_truth(root: Path | str) -> dict[str, dict]:
    """The sidecar of a generated mini-MELD, by key."""
    with (Path(root) / GROUND_TRUTH).open(encoding="utf-8") as fh:
        return {rec["key"]: rec for rec in map(json.loads, fh)}
