"""A random-init model with another model's architecture (or a named one) and a tokenizer, for throughput
runs where the weights cannot travel (the GPU check: even the embedded LLM's 540 MB do not fit the
machine's transfer, an 8B model's 16 GB still less).

    python benchmarks/random_llm.py SOURCE_FOLDER OUT_FOLDER [--seed 0] [--arch llama3-8b]

SOURCE_FOLDER needs only config.json and the tokenizer files. `--arch` takes the architecture from
ARCHS instead of SOURCE's config (the tokenizer stays SOURCE's: LLaMA-3's own cannot be fetched; a
smaller vocabulary only means ids above it never occur in prompts). The model is built on the meta
device and never held whole: each tensor is drawn (on the GPU if there is one), written to a
safetensors shard and dropped, so an 8B model costs its 16 GB of bf16 on disk, not in memory; loading
it with `quantization=nf4` then quantises it tensor by tensor on the GPU. Speed does not depend on
the weights' values; what the model says does, so nothing but throughput is read from such a model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

# LLaMA-3-8B's config.json (Meta-Llama-3-8B): GQA with 8 KV heads, 128,256-token vocabulary, untied head.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu")  # fmt: skip
ARCHS = {
    "llama3-8b": LLAMA3_8B,
    # the same family, tiny: for the check's --quick CPU run (same code path, real vocabulary size)
    "llama3-tiny": dict(LLAMA3_8B, hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2),  # fmt: skip
}
SHARD_BYTES = 2 * 2**30


def architecture(source: Path, arch: str | None, tokenizer) -> AutoConfig:
    if arch is None:
        return AutoConfig.from_pretrained(source)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaConfig(**ARCHS[arch], **ids, dtype="bfloat16")


def write_random_weights(config, out: Path, seed: int) -> int:
    """Draw every tensor of `config`'s model (normal(0, 0.02) matrices, unit norms) and write it, one
    shard in memory at a time; returns the parameter count. Tied tensors are written once."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype or "float32")
    shards: list[dict[str, torch.Size]] = [{}]  # the plan: names and shapes per shard, from the meta model
    seen, size = set(), 0
    for name, tensor in meta.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes = tensor.numel() * dtype.itemsize
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.shape
        size += nbytes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(seed)
    weight_map, total = {}, 0
    for index, shapes in enumerate(shards):
        tensors = {
            name: torch.ones(shape, dtype=dtype) if len(shape) == 1
            else torch.randn(shape, generator=generator, device=device).mul_(0.02).to(dtype).cpu()
            for name, shape in shapes.items()
        }  # fmt: skip
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() for t in tensors.values())
    index = {"metadata": {"total_size": total * dtype.itemsize}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=sorted(ARCHS), help="this architecture instead of SOURCE's")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    config = architecture(args.source, args.arch, tokenizer)
    config.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = write_random_weights(config, args.out, args.seed)
    shape = args.arch or f"the architecture of {args.source}"
    (args.out / "RANDOM_INIT").write_text(f"random init (seed {args.seed}) with {shape}\n")
    print(f"{args.out}: {params / 1e6:,.0f}M parameters, {shape}, random init (seed {args.seed})")


if __name__ == "__main__":
    main()
