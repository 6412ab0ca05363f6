"""Evaluation benchmark: merg's batched, Ray-parallel sweep vs the reference way, same model and pairs.

    .venv/bin/python benchmarks/evaluate.py [--pairs 48] [--presets default,reference]

Both score the same test pairs (real MELD dialogues from ../shared/meld-text or the generator's bank, `next_utterance`
targets) with the embedded SmolLM2-135M (full precision), for each decoding preset (a cell):
- merg: `evaluation.sweep` (one Ray task per cell, batched generation and scoring, metrics on
  whole arrays);
- reference: the reference notebooks' way: cell after cell, pair by pair: generate (batch 1), then
  perplexity, BERTScore, emotion and sentiment of that one reply.
Prints examples/s and the ratio (goal >= 4x).

`--generation-only` times the model part alone, on a GPU if there is one (no Ray, no metric models):
merg's one-pass batched `generate_and_score` vs the reference way's batch-1 generation, then batch-1
scoring of the gold reply; `--model` picks the LLM folder.

`--backends hf,vllm` compares the generation backends on the same pairs (greedy `default` preset, full
precision, `--threads` each): HF's batched `generate()` (left-padded, `--batch-size`), merg's HF cell path
(`generate_and_score`: replies and gold-reply scores in one pass) and the vLLM backend (its own
environment: `merg models install-vllm`; replies and scores, and replies alone), start-up shown apart
and excluded from the rates; then how many greedy replies are token for token HF's, and a class for
every one that is not (the first differing token, and HF's margin between its top two logits there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_store import build_text_store  # noqa: E402
from evaluation.evaluate import Cell, Scorers, load_pairs, load_system  # noqa: E402
from evaluation.generate import PRESETS, generate_and_score, generate_replies, score_references  # noqa: E402
from evaluation.metrics import vader_compound  # noqa: E402
from featurestore.store import Store  # noqa: E402
from infra.config import EvaluateConfig, MergConfig, PathsConfig, SystemSpec  # noqa: E402


def reference_way(config: MergConfig, cells: list[Cell]) -> int:
    ec = config.evaluate
    scorers = Scorers(ec, config.paths.model_cache)
    done = 0
    for cell in cells:
        model, tokenizer, _, _, soft, _, _ = load_system(cell.system, config.paths.model_cache, torch.device("cpu"))
        pairs, _, _ = load_pairs(Store.open(config.paths.store), ec, cell.split, "text")
        for pair in pairs:
            reply = generate_replies(model, tokenizer, [pair], PRESETS[cell.preset], system=ec.system_prompt, soft_tokens=0, batch_size=1)[0]
            score_references(model, tokenizer, [pair], system=ec.system_prompt, soft_tokens=0, max_length=ec.max_length, batch_size=1)
            scorers.bertscore([reply], [pair.reference])
            scorers.emotion.probs([reply, pair.reference])
            vader_compound([reply, pair.reference])
            done += 1
    return done


def generation_only(config: MergConfig, cells: list[Cell]) -> dict:
    """Seconds for the model work of `cells`: merg's batched one pass vs the reference's batch-1 way."""
    ec = config.evaluate
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _, _, _, _, _ = load_system(cells[0].system, config.paths.model_cache, device)
    pairs, _, _ = load_pairs(Store.open(config.paths.store), ec, "test", "text")
    seconds = {"merg": 0.0, "reference": 0.0}
    generate_and_score(model, tokenizer, pairs[:2], PRESETS[cells[0].preset], system=ec.system_prompt, soft_tokens=0,
                       max_length=ec.max_length, batch_size=2)  # warm-up (kernels, allocator), not timed
    for cell in cells:
        start = time.perf_counter()
        generate_and_score(model, tokenizer, pairs, PRESETS[cell.preset], system=ec.system_prompt, soft_tokens=0,
                           max_length=ec.max_length, batch_size=ec.batch_size, seed=ec.seed)  # fmt: skip
        seconds["merg"] += time.perf_counter() - start
        start = time.perf_counter()
        for pair in pairs:
            generate_replies(model, tokenizer, [pair], PRESETS[cell.preset], system=ec.system_prompt, soft_tokens=0, batch_size=1)
            score_references(model, tokenizer, [pair], system=ec.system_prompt, soft_tokens=0, max_length=ec.max_length, batch_size=1)
        seconds["reference"] += time.perf_counter() - start
    return seconds


def disagreement(model, tokenizer, prompt: list[int], hf_reply: str, vllm_reply: str) -> str:
    """Why two greedy replies differ: where they part (re-tokenized) and HF's top-2 logit margin there."""
    a, b = (tokenizer(r, add_special_tokens=False)["input_ids"] for r in (hf_reply, vllm_reply))
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    with torch.no_grad():
        logits = model.llm(input_ids=torch.tensor([prompt + a[:k]])).logits[0, -1].float()
    top = logits.topk(2).values
    margin = float(top[0] - top[1])
    if k == min(len(a), len(b)):
        return f"stop: one reply ends at token {k}, the other goes on (HF's top-2 margin there {margin:.2g})"
    second = int(logits.topk(2).indices[1])
    if second == b[k] and margin < 0.05:
        return f"near tie at token {k}: vLLM took HF's runner-up, {margin:.2g} logits behind (float summation order)"
    return f"token {k}: vLLM's token is not HF's runner-up (HF's top-2 margin {margin:.2g})"


def compare_backends(config: MergConfig, threads: int, batch_size: int, rounds: int) -> tuple[list[tuple[str, float, float]], dict]:
    """(way, seconds, start-up seconds) rows and the greedy agreement of vLLM with HF. The pairs go in
    `rounds` slices, each through every way in turn, so a shared machine's swings in load fall on all ways."""
    from evaluation.evaluate import HFBackend, describe_system
    from evaluation.generate import generation_prompt
    from evaluation.vllm_backend import VllmBackend

    ec, cache = config.evaluate, config.paths.model_cache
    spec = ec.systems[0]
    torch.set_num_threads(threads)
    system = describe_system(spec, cache)
    pairs, _, _ = load_pairs(Store.open(config.paths.store), ec, "test", "text")
    model, tokenizer, *_ = load_system(spec, cache, torch.device("cpu"))
    preset = PRESETS["default"]
    hf_backend = HFBackend(model, tokenizer, ec, preset, ec.system_prompt, 0)
    batches = lambda part: [part[i : i + batch_size] for i in range(0, len(part), batch_size)]  # noqa: E731
    ways = [f"HF generate() (batch {batch_size}, left padding)", f"HF generate_and_score (merg's cell path: replies + gold-reply scores, batch {batch_size})",
            "vLLM: replies alone (prompts not cached yet)", "vLLM: gold-reply scores, then replies (text-only systems' cell path)"]  # fmt: skip
    seconds, hf, vllm = dict.fromkeys(ways, 0.0), [], []
    start = time.perf_counter()
    with VllmBackend(ec.model_copy(update={"cpus_per_cell": threads}), spec, system, cache, ec.system_prompt, preset, torch.device("cpu")) as backend:
        startup = time.perf_counter() - start
        size = -(-len(pairs) // rounds)
        for part in (pairs[i : i + size] for i in range(0, len(pairs), size)):
            runs = [
                lambda: generate_replies(model, tokenizer, part, preset, system=ec.system_prompt, soft_tokens=0, batch_size=batch_size),
                lambda: hf.extend(r for replies, _, _ in hf_backend(batches(part)) for r in replies),
                lambda: backend._replies(part, [backend._prompt(p) for p in part]),
                lambda: vllm.extend(r for replies, _, _ in backend(batches(part)) for r in replies),
            ]
            for way, run in zip(ways, runs):
                began = time.perf_counter()
                run()
                seconds[way] += time.perf_counter() - began
    classes = {}
    for pair, a, b in zip(pairs, hf, vllm):
        if a != b:
            prompt = generation_prompt(tokenizer, pair, system=ec.system_prompt, soft_tokens=0, max_length=ec.max_length,
                                       max_new_tokens=preset.max_new_tokens).encoded.input_ids  # fmt: skip
            classes[pair.key] = dict(reason=disagreement(model, tokenizer, prompt, a, b), hf=a, vllm=b)
    rows = [(way, seconds[way], startup if way.startswith("vLLM") else 0.0) for way in ways]
    return rows, {"pairs": len(pairs), "identical": len(pairs) - len(classes), "disagreements": classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--presets", default="default,reference")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="LLM: the embedded default or a local HF folder")
    parser.add_argument("--generation-only", action="store_true", help="only the model part, on a GPU if present")
    parser.add_argument("--backends", help="hf,vllm: compare the generation backends (replies/s, start-up, agreement)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for each backend (--backends)")
    parser.add_argument("--rounds", type=int, default=4, help="slices of the pairs, each through every way in turn (--backends)")
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile instead of eager (--backends)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from evaluation import sweep
    from infra.runtime import configure_logging, configure_offline

    configure_offline()
    configure_logging()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        print(f"dialogues from {build_text_store(root, 'test', args.pairs)}")
        system = SystemSpec(name="pretrained", model=args.model, modality="text", quantization="none")
        presets = args.presets.split(",")
        evaluate = EvaluateConfig(sweep="bench", systems=[system], presets=presets, limit=args.pairs, batch_size=args.batch_size,
                                  emotion_backend="lexicon", bootstrap_samples=200, vllm_compile=args.compile)  # fmt: skip
        config = MergConfig(paths=PathsConfig(store=root), evaluate=evaluate)
        cells = [Cell("bench", system, p, "test") for p in presets]

        if args.backends:
            rows, agreement = compare_backends(config, args.threads, args.batch_size, args.rounds)
            _print_backends(rows, agreement, args)
            return
        if args.generation_only:
            seconds = generation_only(config, cells)
            merg_s, reference_s, n = seconds["merg"], seconds["reference"], len(cells) * args.pairs
            ways = ("reference (batch 1: generate, then score the gold reply)", f"merg generate_and_score (one pass, batch {args.batch_size})")
        else:
            start = time.perf_counter()
            report = sweep(config)
            merg_s = time.perf_counter() - start
            assert len(report.done) == len(cells), report.failed
            torch.set_num_threads(max(1, torch.get_num_threads()))
            start = time.perf_counter()
            n = reference_way(config, cells)
            reference_s = time.perf_counter() - start
            ways = ("reference (batch 1, metrics per pair, cells in turn)", f"merg sweep (Ray tasks per cell, batch {args.batch_size})")
    merg_rate, ref_rate = n / merg_s, n / reference_s
    device = torch.cuda.get_device_name() if args.generation_only and torch.cuda.is_available() else "CPU"
    table = Table(title=f"evaluation{' (model part)' if args.generation_only else ''}: {n} pair-cells "
                        f"({len(cells)} cells x {args.pairs} pairs), {args.model}, {device}")  # fmt: skip
    for column in ("way", "seconds", "examples/s", "ratio"):
        table.add_column(column, justify="left" if column == "way" else "right")
    table.add_row(ways[0], f"{reference_s:.1f}", f"{ref_rate:.2f}", "1.00x")
    table.add_row(ways[1], f"{merg_s:.1f}", f"{merg_rate:.2f}", f"{merg_rate / ref_rate:.2f}x")
    Console(width=120).print(table)
    if args.json:
        import json

        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None  # the batched pass's
        args.json.write_text(json.dumps({"merg_examples_per_s": merg_rate, "reference_examples_per_s": ref_rate,
                                         "ratio": merg_rate / ref_rate, "pair_cells": n, "batch_size": args.batch_size,
                                         "peak_mb": peak_mb}, indent=2))  # fmt: skip


def _print_backends(rows: list[tuple[str, float, float]], agreement: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    n = agreement["pairs"]
    baseline = n / rows[0][1]
    mode = "compiled" if args.compile else "eager"
    table = Table(title=f"generation backends: {n} real MELD test pairs in {args.rounds} rounds, {args.model} float32, greedy, "
                        f"{args.threads} thread(s), vLLM {mode}")  # fmt: skip
    for column in ("way", "seconds", "start-up s", "replies/s", "x HF generate()"):
        table.add_column(column, justify="left" if column == "way" else "right")
    for way, seconds, startup in rows:
        table.add_row(way, f"{seconds:.1f}", f"{startup:.0f}" if startup else "–", f"{n / seconds:.2f}", f"{n / seconds / baseline:.2f}x")
    console = Console(width=160)
    console.print(table)
    console.print(f"greedy agreement: {agreement['identical']}/{n} replies identical to HF's ({agreement['identical'] / n:.1%})")
    for key, d in agreement["disagreements"].items():
        console.print(f"- {key}: {d['reason']}\n    HF:   {d['hf']}\n    vLLM: {d['vllm']}", markup=False, highlight=False)
    if args.json:
        import json

        args.json.write_text(json.dumps({"rows": [dict(way=w, seconds=s, startup=u, replies_per_s=n / s) for w, s, u in rows],
                                         **agreement}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
