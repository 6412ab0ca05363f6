"""The trainer end to end on a tiny Llama (seconds), and once on the embedded SmolLM2 (slow)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from featurestore.schema import TARGETS
from featurestore.store import Store
from infra.models import ModelNotFound
from training import load_run, train
from training.data import DataError
from infra.config import REPO_ROOT
from training.trainer import Trainer

from tests.conftest import DIM, dialogue_rows, train_config


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_and_vanilla_peft_reload(dialogue_store, tiny_llm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = train(train_config(dialogue_store, tmp_path, tiny_llm, name="mm", modality="audio+video", quantization="none"))
    run = tmp_path / "mm"
    assert report.steps == 4 and report.best_val_loss is not None
    for name in ("adapter/adapter_config.json", "projector.safetensors", "tokenizer/tokenizer_config.json", "config.yaml", "run.json"):
        assert (run / name).exists(), name
    info = json.loads((run / "run.json").read_text())
    assert info["modality"] == "audio+video" and info["projector"]["in_dim"] == DIM and info["soft_tokens"] == 1
    assert Store.open(dialogue_store).tags()[info["store_tag"]] == info["store_version"]
    targets_tags = Store.open(dialogue_store).lance_dataset(TARGETS).tags.list()  # pinning the tag pins both tables
    assert targets_tags[info["store_tag"]]["version"] == info["targets_version"]
    assert len(_losses(run)) == 4

    base = AutoModelForCausalLM.from_pretrained(tiny_llm)
    vanilla = PeftModel.from_pretrained(base, run / "adapter").eval()
    model, _, _ = load_run(run)
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        assert torch.allclose(vanilla(input_ids=ids).logits, model(ids, torch.ones_like(ids)).logits, atol=1e-5)
        assert not torch.allclose(base.base_model(ids).last_hidden_state.sum(), torch.tensor(0.0))


def test_resume_continues_the_loss_curve_exactly(dialogue_store, tiny_llm, tmp_path):
    settings = dict(modality="audio", max_steps=4, save_every=2, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    train(train_config(dialogue_store, tmp_path, tiny_llm, name="straight", **settings))
    train(train_config(dialogue_store, tmp_path, tiny_llm, name="broken", **settings), until_step=2)
    assert len(_losses(tmp_path / "broken")) == 2
    half = tmp_path / "broken" / "checkpoints" / "step-4.partial"  # a save killed mid-write
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    resumed = Trainer(train_config(dialogue_store, tmp_path, tiny_llm, name="broken", resume=True, **settings)).setup()
    assert resumed.step == 2
    resumed.train()
    assert _losses(tmp_path / "broken") == pytest.approx(_losses(tmp_path / "straight"), rel=1e-5)


@pytest.mark.slow
def test_a_resume_past_the_last_logged_step_keeps_one_metrics_row_per_step(dialogue_store, tiny_llm, tmp_path):
    """issue 27 item 6: killed at step 3 with its last checkpoint at step 2, a resumed run replays step 3;
    metrics.jsonl then holds steps 1, 2, 3, 4 (not 1, 2, 3, 3, 4)."""
    settings = dict(modality="text", max_steps=4, save_every=2, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    train(train_config(dialogue_store, tmp_path, tiny_llm, name="killed", **settings), until_step=3)
    train(train_config(dialogue_store, tmp_path, tiny_llm, name="killed", resume=True, **settings))
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resuming_an_early_stopped_run_trains_no_further(dialogue_store, tiny_llm, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "validate", lambda self: 1.0)  # never improves after the first validation
    settings = dict(modality="audio", max_steps=6, eval_every=1, save_every=10, patience=1)
    report = train(train_config(dialogue_store, tmp_path, tiny_llm, name="es", **settings))
    assert report.stopped_early and report.steps == 2
    best = (tmp_path / "es" / "adapter" / "adapter_model.safetensors").read_bytes()
    again = train(train_config(dialogue_store, tmp_path, tiny_llm, name="es", resume=True, **settings))
    assert again.stopped_early and again.steps == 2 and len(_losses(tmp_path / "es")) == 2
    assert (tmp_path / "es" / "adapter" / "adapter_model.safetensors").read_bytes() == best


def test_text_only_baseline_has_no_projector(dialogue_store, tiny_llm, tmp_path):
    train(train_config(dialogue_store, tmp_path, tiny_llm, name="text", modality="text", max_steps=2))
    info = json.loads((tmp_path / "text" / "run.json").read_text())
    assert info["projector"] is None and info["soft_tokens"] == 0
    assert not (tmp_path / "text" / "projector.safetensors").exists()


def test_clear_errors(dialogue_store, tiny_llm, tmp_path):
    with pytest.raises(ModelNotFound, match="no HF model folder"):
        Trainer(train_config(dialogue_store, tmp_path, tmp_path / "no-such-model")).setup()
    text_store = Store.open(tmp_path / "text-store", create=True, embedding_dim=DIM)
    text_store.write_utterances(dialogue_rows(16, 4).drop_columns(["audio_emb", "vision_emb", "fused_emb"]))
    from training import build_targets
    from infra.config import TargetsConfig

    build_targets(text_store, TargetsConfig(), tmp_path)
    with pytest.raises(DataError, match="--no-media"):
        Trainer(train_config(text_store.root, tmp_path, tiny_llm, modality="video")).setup()
    with pytest.raises(ValueError, match="train.targets_version"):  # a numeric pin says nothing of the targets
        Trainer(train_config(text_store.root, tmp_path, tiny_llm, modality="text", store_version=1)).setup()


@pytest.mark.slow
def test_zero3_with_4bit_weights_saves_gathered_weights(dialogue_store, tiny_llm, tmp_path):
    train(train_config(dialogue_store, tmp_path, tiny_llm, name="z3", modality="audio+video", deepspeed_stage=3,
                       quantization="nf4", max_steps=2))  # fmt: skip
    model, _, info = load_run(tmp_path / "z3")  # strict loads: partitioned (empty) tensors would not fit
    assert info.projector is not None
    assert model.projector.net.weight.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_processes_zero2_on_cpu(dialogue_store, tiny_llm, tmp_path, launcher):
    """`merg train --launcher L --nproc 2`: two gloo processes under ZeRO-2, one checkpoint, rank 0 reports."""
    config = train_config(dialogue_store, tmp_path, tiny_llm, name="ddp", max_steps=2, deepspeed_stage=2)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "train", "--config", str(path), "--launcher", launcher, "--nproc", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    output = result.stderr + result.stdout
    assert result.returncode == 0, output[-3000:]
    assert "2 process(es)" in output and output.count("training done") == 1
    assert len(_losses(tmp_path / "ddp")) == 2 and (tmp_path / "ddp" / "checkpoints" / "step-2").is_dir()


@pytest.mark.slow
def test_smollm2_qlora_loss_decreases(dialogue_store, smollm2, tmp_path):
    config = train_config(
        dialogue_store, tmp_path, "smollm2-135m-instruct", name="smol", max_steps=8, eval_every=8, lr=1e-3,
        projector_lr=1e-3, modality="audio+video", quantization="nf4",
    )  # fmt: skip
    config.paths.model_cache = smollm2.parent
    train(config)
    losses = _losses(tmp_path / "smol")
    assert sum(losses[-2:]) < sum(losses[:2]) * 0.8, losses


def _run_cli_train(config, tmp_path, nproc: int = 2, launcher: str = "torchrun") -> str:
    path = tmp_path / f"{config.train.name}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "train", "--config", str(path), "--launcher", launcher, "--nproc", str(nproc)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    output = result.stderr + result.stdout
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def dev17_store(tmp_path_factory):
    """24 dialogues x 4 lines alternating train/dev: about 30 train and 30 dev pairs."""
    from infra.config import TargetsConfig
    from training import build_targets

    root = tmp_path_factory.mktemp("dev17-store")
    store = Store.open(root, create=True, embedding_dim=DIM)
    store.write_utterances(dialogue_rows(24, 4, splits=("train", "dev")))
    build_targets(store, TargetsConfig(kind="next_utterance"), root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("validation", ["none", "n17"])
def test_two_processes_zero3_partitioned_saves_full_weights(dev17_store, tiny_llm, tmp_path, validation):
    """ZeRO-3 that really partitions (`stage3_param_persistence_threshold: 0`), 2 gloo processes: with
    no validation split the final save gathers; with 17 dev examples (batch 8, one rank's last chunk is
    padding only) validation does not hang; either way the adapter and projector have their full
    shapes, trained values, and load with vanilla PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    zero3 = json.loads((REPO_ROOT / "infra" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3-partitioned.json").write_text(json.dumps(zero3))
    eval_settings = dict(eval_split="test") if validation == "none" else dict(eval_limit=17, eval_every=2)
    config = train_config(
        dev17_store, tmp_path, tiny_llm, name=f"z3-{validation}", modality="audio+video", deepspeed_stage=3,
        deepspeed_config=tmp_path / "zero3-partitioned.json", quantization="none", max_steps=2, batch_size=8,
        lr=1e-2, projector_lr=1e-2, **eval_settings,
    )  # fmt: skip
    output = _run_cli_train(config, tmp_path)
    assert "2 process(es)" in output and ("0 test" in output) == (validation == "none")
    flat = " ".join(output.split())  # the log wraps long lines
    loaded = re.findall(r"rank \d loaded [\d,]+ of [\d,]+ parameter elements \((\d+)%\); its peak RSS rose -?\d+ MB", flat)
    print(re.findall(r"rank \d loaded .*? MB", flat))  # under ZeRO init each rank builds only its share
    assert len(loaded) == 2 and all(45 <= int(share) <= 55 for share in loaded), loaded
    run = tmp_path / f"z3-{validation}"
    projector = load_file(run / "projector.safetensors")
    assert projector["net.weight"].shape == (64, DIM) and projector["net.weight"].abs().sum() > 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llm)
    vanilla = PeftModel.from_pretrained(base, run / "adapter")
    lora_b = [p for n, p in vanilla.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.shape[1] == 4 for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)
    model, _, _ = load_run(run)
    assert model.projector.net.weight.shape == (64, DIM)
