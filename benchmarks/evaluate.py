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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--presets", default="default,reference")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="LLM: the embedded default or a local HF folder")
    parser.add_argument("--generation-only", action="store_true", help="only the model part, on a GPU if present")
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
        evaluate = EvaluateConfig(sweep="bench", systems=[system], presets=presets, limit=args.pairs,
                                  batch_size=args.batch_size, emotion_backend="lexicon", bootstrap_samples=200)  # fmt: skip
        config = MergConfig(paths=PathsConfig(store=root), evaluate=evaluate)
        cells = [Cell("bench", system, p, "test") for p in presets]

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


if __name__ == "__main__":
    main()
