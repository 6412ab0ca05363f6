"""A random-init model with another model's architecture and tokenizer, for throughput runs where the
weights cannot travel (the GPU check: the embedded LLM's 540 MB do not fit the machine's transfer).

    python benchmarks/random_llm.py SOURCE_FOLDER OUT_FOLDER [--seed 0]

SOURCE_FOLDER needs only config.json and the tokenizer files. Speed does not depend on the weights'
values; what the model says does, so nothing but throughput is read from such a model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source))
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.source).save_pretrained(args.out)
    (args.out / "RANDOM_INIT").write_text(f"random init (seed {args.seed}) with the architecture of {args.source}\n")
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random init (seed {args.seed})")


if __name__ == "__main__":
    main()
