"""Training benchmark: merg's trainer vs a plain HF `Trainer` + PEFT loop vs the reference way.

    .venv/bin/python benchmarks/train.py [--steps 6] [--batch-size 8] [--model smollm2-135m-instruct]

Same model (4-bit NF4 + LoRA r=16 on all linear layers), same examples (real MELD dialogues from
../shared/meld-text, else the generator's bank, `next_utterance` targets, text modality so that every variant can run it), same
number of examples seen:
- merg: `training.train` (DeepSpeed ZeRO-2, length-bucketed batches of `--batch-size`);
- merg-zero0: the same under ZeRO stage 0 (what ZeRO's partitioning costs on one device);
- hf-same-batches: `transformers.Trainer` fed merg's exact batches (the same examples, grouped and
  ordered as in merg's first steps): the same work on both sides, so merg / this row is the trainer's gain;
- hf-group-by-length: `transformers.Trainer` with its own length grouping (`group_by_length`) over
  the whole training set: both sides bucket, each its own way;
- hf: `transformers.Trainer` on a random `--steps` x `--batch-size` examples, no bucketing:
  hf-same-batches / this row is what bucketing gains (less padding), merg / this row both together;
- reference: the reference notebooks' loop, one example per step (batch 1, no bucketing).
HF pads each batch to its longest example (DataCollatorForSeq2Seq); the padding column is the share
of pad positions in the batches each variant trained on. `--clock cpu` times the steps in CPU
seconds of one thread (each variant runs with OMP_NUM_THREADS=1) instead of wall seconds: on a busy
shared machine wall time follows the other jobs' load, CPU time follows the work.
merg and hf weigh the loss alike: every target token of an optimiser step counts the same (merg's
token-weighted loss; HF's `num_items_in_batch`, averaged across devices).
Each variant runs in its own process (clean peak memory). Tokens/s counts real (non-pad) tokens over
the time spent in training steps (the first, warm-up step included; setup, validation and checkpoint
writes not); samples/s is tokens/s over the mean example length (real tokens). `--variants` picks
some; a variant that runs out of GPU memory is rerun at half the batch (the table says which batch).
`--model` may be a random-init folder of another architecture (`benchmarks/random_llm.py --arch
llama3-8b`: the GPU check's 8B figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_store import build_text_store  # noqa: E402
from featurestore.store import Store  # noqa: E402
from infra.config import MergConfig, PathsConfig, TrainConfig  # noqa: E402

VARIANTS = ("merg", "merg-zero0", "hf-same-batches", "hf-group-by-length", "hf", "reference")


def config(args, root: Path, zero_stage: int = 2) -> MergConfig:
    return MergConfig(
        paths=PathsConfig(store=root / "store", runs=root / "runs"),
        train=TrainConfig(name="bench", model=args.model, modality="text", batch_size=args.batch_size,
                          max_steps=args.steps, eval_every=10**6, eval_limit=1, save_every=10**6, warmup_steps=0,
                          max_length=256, deepspeed_stage=zero_stage),  # fmt: skip
    )


def merg_batches(examples: list, t) -> list[list[int]]:
    """The batches merg's trainer takes in its first `max_steps` steps (one process, epoch 0)."""
    from training.data import epoch_batches

    batches = epoch_batches(examples, batch_size=t.batch_size, epoch=0, seed=t.seed, bucket=t.bucket_by_length)
    return batches[: t.max_steps * t.grad_accum]


def padded_share(batches: list[list[int]], lengths: list[int]) -> tuple[int, int]:
    """(real tokens, positions) of `batches` padded to their longest example."""
    real = sum(lengths[i] for b in batches for i in b)
    return real, sum(len(b) * max(lengths[i] for i in b) for b in batches)


def run_variant(variant: str, args, root: Path) -> dict:
    from infra.models import resolve_llm
    from training.data import collate, load_examples
    from training.mllm import attach_lora, load_llm, resolve_dtype

    cfg = config(args, root, zero_stage=0 if variant == "merg-zero0" else 2)
    t = cfg.train
    if variant.startswith("merg"):
        from training import train

        report = train(cfg)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_llm(t.model, cfg.paths.model_cache))
        examples = load_examples(Store.open(cfg.paths.store), t, "train", tokenizer)
        real, positions = padded_share(merg_batches(examples, t), [len(e) for e in examples])
        return dict(tokens_per_s=report.tokens_per_s, real_tokens=real, positions=positions)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(t.compute_dtype, device)  # as merg's trainer: bf16 compute on a GPU
    llm, tokenizer = load_llm(resolve_llm(t.model, cfg.paths.model_cache), quantization="nf4", dtype=dtype, device=device)
    model = attach_lora(llm, t.lora)
    examples = load_examples(Store.open(cfg.paths.store), t, "train", tokenizer)
    n = args.steps * args.batch_size
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:n].tolist()
    if variant.startswith("hf"):
        if variant == "hf-same-batches":  # merg's batches, in merg's order, taken as they come
            chosen, sampling = [examples[i] for b in merg_batches(examples, t) for i in b], "sequential"
        elif variant == "hf-group-by-length":  # HF's own bucketing over every example
            chosen, sampling = examples, "group_by_length"
        else:
            chosen, sampling = [examples[i] for i in order], "random"
        return run_hf_trainer(model, tokenizer, chosen, sampling, args, t, root, device, dtype)
    # reference: one example per optimiser step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr)
    tokens, start = 0, time.perf_counter()
    for example in (examples[i] for i in order):
        batch = {k: v.to(model.device) for k, v in collate([example], tokenizer.pad_token_id).items() if k != "media_mask"}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    return dict(tokens_per_s=tokens / (time.perf_counter() - start), real_tokens=tokens, positions=tokens)


def run_hf_trainer(model, tokenizer, examples: list, sampling: str, args, t, root: Path, device, dtype) -> dict:
    """`transformers.Trainer` for `--steps` steps of `--batch-size` over `examples`, drawn by `sampling`
    (`train_sampling_strategy`: sequential, group_by_length or random)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):  # time in training steps, as merg reports it (not train()'s setup)
        seconds, started = 0.0, 0.0

        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self.started

    data = [{"input_ids": e.encoded.input_ids, "labels": e.encoded.labels} for e in examples]
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest")
    seen = {"tokens": 0, "positions": 0}

    def collator(features):
        batch = pad(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        seen["positions"] += batch["attention_mask"].numel()
        return batch

    timer = StepTimer()
    trainer = Trainer(
        model=model, train_dataset=data, data_collator=collator, callbacks=[timer],
        args=TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=args.batch_size,
                               max_steps=args.steps, learning_rate=t.lr, report_to=[], save_strategy="no",
                               logging_steps=10**6, use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
                               dataloader_num_workers=0, average_tokens_across_devices=True,
                               train_sampling_strategy=sampling),
    )  # fmt: skip
    trainer.train()
    return dict(tokens_per_s=seen["tokens"] / timer.seconds, real_tokens=seen["tokens"], positions=seen["positions"])


def mean_example_tokens(args, root: Path) -> float:
    """The mean length (real tokens) of the training examples, to turn tokens/s into samples/s."""
    from transformers import AutoTokenizer

    from infra.models import resolve_llm
    from training.data import load_examples

    cfg = config(args, root)
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm(cfg.train.model, cfg.paths.model_cache))
    examples = load_examples(Store.open(cfg.paths.store), cfg.train, "train", tokenizer)
    return sum(len(e.encoded.input_ids) for e in examples) / len(examples)


def single_process_env() -> dict:
    """This environment without a distributed launch's variables (a caller's process group, e.g. a test
    session's, would otherwise be joined, its port already taken): each variant is one process."""
    launch = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in launch}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gain_split(results: dict) -> list[str]:
    """merg's gain over plain HF split into bucketing (HF on merg's batches vs HF's random batches) and
    the trainer (merg vs HF on the same batches)."""
    speed = {variant: r["tokens_per_s"] for variant, r in results.items()}
    ratios = [("the trainer (merg / hf-same-batches: the same work)", "merg", "hf-same-batches"),
              ("bucketing (hf-same-batches / hf: the same trainer)", "hf-same-batches", "hf"),
              ("HF's own bucketing (hf-group-by-length / hf)", "hf-group-by-length", "hf"),
              ("both (merg / hf)", "merg", "hf"),
              ("merg against HF's own bucketing (merg / hf-group-by-length)", "merg", "hf-group-by-length")]  # fmt: skip
    return [f"{what}: {speed[a] / speed[b]:.2f}x" for what, a, b in ratios if a in speed and b in speed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dialogues", type=int, default=60, help="first N MELD train dialogues")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {','.join(VARIANTS)}")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="time steps in wall or one-thread CPU seconds")
    args = parser.parse_args()
    if args.variant:  # child process: one variant, figures as JSON on the last line
        from infra.runtime import configure_offline

        configure_offline()
        if args.clock == "cpu":  # every step timer (merg's trainer, HF's callback, the batch-1 loop) reads CPU time
            torch.set_num_threads(1)
            time.perf_counter = time.process_time
        result = run_variant(args.variant, args, args.root)
        print(json.dumps(dict(result, peak_mb=peak_memory_mb())))
        return

    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = build_text_store(root / "store", "train", args.dialogues)
        print(f"dialogues from {source}")
        mean_tokens = mean_example_tokens(args, root)
        results = {}
        for variant in args.variants.split(","):
            batch = args.batch_size
            while True:
                cmd = [sys.executable, __file__, "--variant", variant, "--root", str(root), "--steps", str(args.steps),
                       "--batch-size", str(batch), "--model", args.model, "--clock", args.clock]  # fmt: skip
                env = dict(single_process_env(), **({"OMP_NUM_THREADS": "1"} if args.clock == "cpu" else {}))
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
                if done.returncode and batch > 1 and "out of memory" in done.stderr.lower():
                    print(f"{variant}: out of GPU memory at batch {batch}; again at batch {batch // 2}")
                    batch //= 2
                    continue
                break
            if done.returncode:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[variant] = dict(result, batch_size=batch, samples_per_s=result["tokens_per_s"] / mean_tokens)
            if args.json:  # after each variant: a time limit that stops the rest keeps these
                args.json.write_text(json.dumps(results, indent=2))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = Table(title=f"training throughput: {args.model}, NF4 + LoRA, {args.steps} steps x batch {args.batch_size} ({device})")
    for column in ("variant", "batch", "tokens/s" if args.clock == "wall" else "tokens/CPU-s", "samples/s", "padding", "peak memory (MB)", "merg speed-up"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    first = next(iter(results.values()))
    for variant, r in results.items():
        table.add_row(variant, str(r["batch_size"]), f"{r['tokens_per_s']:,.0f}", f"{r['samples_per_s']:,.2f}",
                      f"{1 - r['real_tokens'] / r['positions']:.0%}", f"{r['peak_mb']:,.0f}",
                      f"{results.get('merg', first)['tokens_per_s'] / r['tokens_per_s']:.2f}x")  # fmt: skip
    Console(width=120).print(table)
    for line in gain_split(results):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
