"""Evaluation benchmark: merg's batched, Ray-parallel sweep vs the reference way, same model and pairs.

    .venv/bin/python benchmarks/evaluate.py [--pairs 48] [--presets default,reference]

Both score the same test pairs (real MELD dialogues from ../shared/meld-text or the generator's bank, `next_utterance`
targets) with the embedded SmolLM2-135M (full precision), for each decoding preset (a cell):
- merg: `evaluation.sweep` (one Ray task per cell, batched generation and scoring, metrics on
  whole arrays);
- reference: the reference notebooks' way: cell after cell, pair by pair: generate (batch 1), then
  perplexity, BERTScore, emotion and sentiment of that one reply.
Prints examples/s and the ratio (goal >= 4x).
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
from evaluation.generate import PRESETS, generate_replies, score_references  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--presets", default="default,reference")
    parser.add_argument("--batch-size", type=int, default=16)
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
        system = SystemSpec(name="SmolLM2 pretrained", modality="text", quantization="none")
        presets = args.presets.split(",")
        evaluate = EvaluateConfig(sweep="bench", systems=[system], presets=presets, limit=args.pairs,
                                  batch_size=args.batch_size, emotion_backend="lexicon", bootstrap_samples=200)  # fmt: skip
        config = MergConfig(paths=PathsConfig(store=root), evaluate=evaluate)
        cells = [Cell("bench", system, p, "test") for p in presets]

        start = time.perf_counter()
        report = sweep(config)
        merg_s = time.perf_counter() - start
        assert len(report.done) == len(cells), report.failed
        torch.set_num_threads(max(1, torch.get_num_threads()))
        start = time.perf_counter()
        n = reference_way(config, cells)
        reference_s = time.perf_counter() - start
    merg_rate, ref_rate = n / merg_s, n / reference_s
    table = Table(title=f"evaluation: {n} pair-cells ({len(cells)} cells x {args.pairs} pairs), SmolLM2-135M, CPU")
    for column in ("way", "seconds", "examples/s", "ratio"):
        table.add_column(column, justify="left" if column == "way" else "right")
    table.add_row("reference (batch 1, metrics per pair, cells in turn)", f"{reference_s:.1f}", f"{ref_rate:.2f}", "1.00x")
    table.add_row(f"merg sweep (Ray tasks per cell, batch {args.batch_size})", f"{merg_s:.1f}", f"{merg_rate:.2f}", f"{merg_rate / ref_rate:.2f}x")
    Console(width=120).print(table)
    if args.json:
        import json

        args.json.write_text(json.dumps({"merg_examples_per_s": merg_rate, "reference_examples_per_s": ref_rate,
                                         "ratio": merg_rate / ref_rate, "pair_cells": n}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
