"""The GPU path of training: 4-bit QLoRA on CUDA under DeepSpeed ZeRO-2, bf16 (skipped without a GPU)."""

import json

import pytest

from tests.conftest import train_config

pytestmark = pytest.mark.gpu


def test_qlora_nf4_zero2_on_cuda(dialogue_store, tiny_llm, tmp_path):
    import torch

    from training import load_run, train

    torch.cuda.reset_peak_memory_stats()
    report = train(train_config(dialogue_store, tmp_path, tiny_llm, name="cuda", modality="audio+video",
                                quantization="nf4", compute_dtype="bfloat16", max_steps=4))  # fmt: skip
    assert report.steps == 4 and report.best_val_loss is not None
    losses = [json.loads(line)["loss"] for line in (tmp_path / "cuda" / "metrics.jsonl").read_text().splitlines()]
    assert all(map(lambda x: x == x, losses))  # no NaN under bf16
    model, _, _ = load_run(tmp_path / "cuda", device=torch.device("cuda"))
    assert model.device.type == "cuda"
