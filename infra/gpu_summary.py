"""The GPU check's summary: one table of its figures, each beside its goal with "met", "not met" or
"not measured", and an estimate of full MELD through the preprocessing job on one 16-core + 1-GPU node
from the measured stage rates.

    python -m infra.gpu_summary OUT_DIR LLM_NOTE [--quick]

Reads what `infra/gpu_check.sh` left in OUT_DIR (<step>.json, <step>.gpumem, <step>.log, steps.txt,
env.json) and prints Markdown. With --quick (a CPU dry run at tiny sizes) nothing is judged.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

MELD_CLIPS = 13_708
MELD_FRAMES = 13.7 * 3600 * 25  # ~13.7 h of video at 25 fps: ~1.23 M frames
REFERENCE_SAMPLES_PER_S = 6.28  # the reference system's QLoRA: A100, batch 1
ESTIMATE_GOAL_S = 600
# the goals, as worded in the table
ENCODER_GOAL, COSINE_GOAL = 3.0, 0.999
S3FD_GOAL = 4000.0
HF_RATIO_GOAL, SAMPLES_GOAL = 0.9, 10.0
GENERATION_GOAL = 8.0


@dataclass
class Row:
    measure: str
    figure: str
    memory: str = ""
    goal: str = ""
    verdict: str = ""


def judged(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


class CheckOutput:
    """The files one run of the check left behind."""

    def __init__(self, out: Path):
        self.out = out

    def json(self, name: str) -> dict:
        path = self.out / f"{name}.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}

    def sampled_memory(self, name: str) -> str:
        path = self.out / f"{name}.gpumem"
        values = [int(v) for v in path.read_text().split() if v.isdigit()] if path.is_file() else []
        return f"{max(values):,} MiB (nvidia-smi)" if values else ""

    def why_missing(self, name: str) -> str:
        """The last line of a step's log: why it left no figures."""
        path = self.out / f"{name}.log"
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
        return f"not measured: {lines[-1].strip()[:160]}" if lines else f"not measured: step {name} did not run"


def torch_memory(record: dict) -> str:
    return f"{record['peak_mb']:,.0f} MB (torch)" if record.get("peak_mb") else ""


def encoder_rows(check: CheckOutput) -> tuple[list[Row], float | None]:
    """One row per size and dtype; returns the fastest rate within the cosine goal (huge if measured)."""
    enc = check.json("encoder")
    runs = enc.get("runs", [])
    if not runs:
        return [Row("encoder stage, ImageBind huge", check.why_missing("encoder"), verdict="not measured")], None
    rows = []
    for r in runs:
        figure = f"{r['clips_per_s']:,.1f} clips/s"
        goal = verdict = ""
        if r["dtype"] != "float32":
            figure += f" ({r['speedup']:.2f}x fp32; min cosine to fp32 {r['min_cosine_to_fp32']:.5f})"
            if r["size"] == "huge":
                goal = f">= {ENCODER_GOAL:g}x fp32 clips/s, cosine >= {COSINE_GOAL}"
                verdict = judged(r["speedup"] >= ENCODER_GOAL and r["min_cosine_to_fp32"] >= COSINE_GOAL)
        memory = torch_memory(r) or check.sampled_memory("encoder")
        rows.append(Row(f"encoder stage, ImageBind {r['size']} (random init), {r['dtype']}, batch {enc['batch_size']}",
                        figure, memory, goal, verdict))  # fmt: skip
    size = "huge" if any(r["size"] == "huge" for r in runs) else runs[0]["size"]
    faithful = [r["clips_per_s"] for r in runs if r["size"] == size and r["min_cosine_to_fp32"] >= COSINE_GOAL]
    return rows, max(faithful, default=None)


def speaker_rows(check: CheckOutput) -> list[Row]:
    asd = check.json("asd")
    if "s3fd_frames_per_s" not in asd:
        return [Row("speaker stage (faithful: S3FD every frame, TalkNet over tracks)", check.why_missing("asd"),
                    goal=f">= {S3FD_GOAL:,.0f} S3FD frames/s", verdict="not measured")]  # fmt: skip
    memory = check.sampled_memory("asd")
    rows = [Row(f"speaker stage: S3FD every frame, official scale ({asd.get('device', '?')})", f"{asd['s3fd_frames_per_s']:,.0f} frames/s",
                memory, f">= {S3FD_GOAL:,.0f} frames/s", judged(asd["s3fd_frames_per_s"] >= S3FD_GOAL))]  # fmt: skip
    if asd.get("talknet_share") is not None:
        rows.append(Row("speaker stage: TalkNet's share of its time", f"{asd['talknet_share']:.0%}", goal="reported", verdict="reported"))
    if asd.get("faithful_clips_per_s") is not None:
        rows.append(Row("speaker stage (faithful), whole", f"{asd['faithful_clips_per_s']:,.1f} clips/s"))
    return rows


def decode_rows(check: CheckOutput) -> list[Row]:
    dec = check.json("decode")
    if "frames_per_s" not in dec:
        return [Row("CPU decode, every frame, all cores", check.why_missing("decode"), verdict="not measured")]
    return [Row(f"CPU decode, every frame, {dec['workers']} processes ({dec['decoder']})", f"{dec['frames_per_s']:,.0f} frames/s")]


def meld_estimate(check: CheckOutput, encoder_rate: float | None) -> Row:
    """Full MELD through the job: decode on the CPUs while the GPU runs the speaker stage then ImageBind;
    with the stages overlapped (Ray Data streams) the slower side sets the time."""
    measure = f"full MELD ({MELD_CLIPS:,} clips, {MELD_FRAMES / 1e6:.2f} M frames) through the job, one 16-core + 1-GPU node, estimated"
    goal = f"<= {ESTIMATE_GOAL_S // 60} min"
    dec, asd = check.json("decode"), check.json("asd")
    missing = [name for name, ok in (("CPU decode", "frames_per_s" in dec), ("speaker stage", "s3fd_frames_per_s" in asd),
                                     ("encoder", encoder_rate is not None)) if not ok]  # fmt: skip
    if missing:
        return Row(measure, f"not measured: needs {', '.join(missing)}", goal=goal, verdict="not measured")
    decode_s = MELD_FRAMES / dec["frames_per_s"]
    share = asd.get("talknet_share") or 0.0
    speaker_s = MELD_FRAMES / asd["s3fd_frames_per_s"] / (1 - min(share, 0.99))  # S3FD's time is (1 - share) of the stage's
    encoder_s = MELD_CLIPS / encoder_rate
    overlapped, serial = max(decode_s, speaker_s + encoder_s), decode_s + speaker_s + encoder_s
    figure = (f"{overlapped / 60:.1f} min overlapped (CPU decode {decode_s / 60:.1f} min on {dec['workers']} cores, beside GPU: "
              f"speaker {speaker_s / 60:.1f} + ImageBind-huge {encoder_s / 60:.1f} min); {serial / 60:.1f} min one after another")  # fmt: skip
    return Row(measure, figure, goal=goal, verdict=judged(overlapped <= ESTIMATE_GOAL_S))


def train_rows(check: CheckOutput) -> list[Row]:
    train = check.json("train")
    if not train:
        return [Row("QLoRA NF4 + LoRA", check.why_missing("train"), verdict="not measured")]
    rows, merg = [], train.get("merg")
    for variant, r in train.items():
        figure, goal, verdict = f"{r['tokens_per_s']:,.0f} tokens/s, {r['samples_per_s']:,.2f} samples/s", "", ""
        if variant == "merg":
            times = r["samples_per_s"] / REFERENCE_SAMPLES_PER_S
            figure += f" ({times:.1f}x the reference system's {REFERENCE_SAMPLES_PER_S} samples/s, A100 batch 1)"
            goal, verdict = f">= {SAMPLES_GOAL:g}x {REFERENCE_SAMPLES_PER_S} samples/s", judged(times >= SAMPLES_GOAL)
        elif merg:
            ratio = merg["tokens_per_s"] / r["tokens_per_s"]
            figure += f" (merg {ratio:.2f}x)"
            if variant == "hf":
                goal, verdict = f"merg >= {HF_RATIO_GOAL}x HF tokens/s", judged(ratio >= HF_RATIO_GOAL)
        rows.append(Row(f"QLoRA NF4 + LoRA (all linear), {variant}, batch {r.get('batch_size', '?')}", figure,
                        torch_memory(r), goal, verdict))  # fmt: skip
    if "hf" not in train:  # the step stopped after merg's variant
        rows.append(Row("QLoRA NF4 + LoRA (all linear), hf", check.why_missing("train"), goal=f"merg >= {HF_RATIO_GOAL}x HF tokens/s",
                        verdict="not measured"))  # fmt: skip
    return rows


def evaluate_rows(check: CheckOutput) -> list[Row]:
    ev = check.json("evaluate")
    if not ev:
        return [Row("batched generate-and-score", check.why_missing("evaluate"), verdict="not measured")]
    memory = torch_memory(ev) or check.sampled_memory("evaluate")
    return [
        Row(f"generate-and-score, merg one pass, batch {ev.get('batch_size', '?')}", f"{ev['merg_examples_per_s']:.2f} examples/s "
            f"({ev['ratio']:.2f}x batch 1)", memory, f">= {GENERATION_GOAL:g}x batch 1", judged(ev["ratio"] >= GENERATION_GOAL)),
        Row("generate-and-score, the reference way (batch 1: generate, then score)", f"{ev['reference_examples_per_s']:.2f} examples/s"),
    ]  # fmt: skip


def summary(out: Path, llm: str, quick: bool = False) -> str:
    check = CheckOutput(out)
    env = check.json("env")
    encoder, encoder_rate = encoder_rows(check)
    rows = [*encoder, *speaker_rows(check), *decode_rows(check), meld_estimate(check, encoder_rate),
            *train_rows(check), *evaluate_rows(check)]  # fmt: skip
    lines = [f"GPU: {env.get('gpu') or 'none'} ({env.get('gpus', 0)} visible); CUDA {env.get('cuda')}; LLM: {llm}", ""]
    if quick:
        lines += ["**--quick: a CPU dry run at tiny sizes; no goal is judged.**", ""]
    lines += ["| measure | figure | peak GPU memory | goal | met? |", "|---|---|---|---|---|"]
    for row in rows:
        verdict = "(quick)" if quick and row.goal else row.verdict
        lines.append(f"| {row.measure} | {row.figure} | {row.memory} | {row.goal} | {verdict} |")
    steps = out / "steps.txt"
    lines += ["", "steps (exit code, seconds):", "", steps.read_text() if steps.is_file() else "(none ran)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("llm")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(summary(args.out, args.llm, args.quick))


if __name__ == "__main__":
    main()
