"""The GPU check's pieces, on CPU: its mechanics end to end (--quick), the bundle's unpacking, the
random-init LLM, and the imports that must work on a GPU machine without PyAV, Ray or decord."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_gpu_check_runs_every_step_and_writes_the_summary(tmp_path):
    done = subprocess.run(["bash", "infra/gpu_check.sh", str(tmp_path), "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = dict(line.split()[:2] for line in (tmp_path / "steps.txt").read_text().splitlines())
    # the speaker benchmark's --device option may not be here yet: then its step says so and is skipped
    failed = {name: (tmp_path / f"{name}.log").read_text()[-3000:] for name, rc in steps.items()
              if rc != "rc=0" and not (name == "asd" and rc == "rc=skipped")}  # fmt: skip
    assert list(steps) == ["encoder", "decode", "asd", "llm", "train", "evaluate", "gpu-tests"] and not failed, failed
    encoder = json.loads((tmp_path / "encoder.json").read_text())
    assert [r["dtype"] for r in encoder["runs"]] == ["float32", "bfloat16"]
    train = json.loads((tmp_path / "train.json").read_text())
    assert set(train) == {"merg", "hf"} and all(r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 for r in train.values())
    assert json.loads((tmp_path / "decode.json").read_text())["frames_per_s"] > 0
    summary = (tmp_path / "summary.md").read_text()
    for row in ("ImageBind small (random init), bfloat16", "CPU decode, every frame", "full MELD", "QLoRA NF4 + LoRA (all linear), merg",
                "generate-and-score, merg one pass", "llama3-tiny"):  # fmt: skip
        assert row in summary


def test_bundle_unpacks_wheels_keeps_cuda13_libs_and_names_merg(tmp_path, monkeypatch):
    from infra import gpu_bundle

    wheel = tmp_path / "bitsandbytes-0-py3-none-any.whl"
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64"]
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("bitsandbytes/__init__.py", "")
        for lib in libs:
            archive.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"\0")
    gpu_bundle.unpack([wheel], tmp_path / "site")
    kept = sorted(p.name for p in (tmp_path / "site" / "bitsandbytes").glob("*.so"))
    assert kept == [f"libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda130", "cuda132")]
    (info,) = (tmp_path / "site").glob("merg-*.dist-info")
    assert "Name: merg" in (info / "METADATA").read_text()


def test_random_llm_has_the_architecture_and_tokenizer_not_the_weights(tiny_llm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "random"
    subprocess.run([sys.executable, "benchmarks/random_llm.py", str(tiny_llm), str(out), "--seed", "1"], cwd=REPO, check=True)
    source, copy = AutoModelForCausalLM.from_pretrained(tiny_llm), AutoModelForCausalLM.from_pretrained(out)
    assert copy.config.to_dict()["num_hidden_layers"] == source.config.num_hidden_layers
    assert not torch.equal(copy.model.layers[0].mlp.up_proj.weight, source.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_llm).get_vocab()
    assert "random init" in (out / "RANDOM_INIT").read_text()


def test_random_llm_arch_is_llama3_shaped_and_written_in_shards(tiny_llm, tmp_path, monkeypatch):
    """`--arch`: the named architecture (GQA, LLaMA-3's vocabulary, untied head) with the source's tokenizer,
    written shard by shard from the meta device; the shards load back as one model."""
    from transformers import AutoModelForCausalLM

    from benchmarks import random_llm

    monkeypatch.setattr(random_llm, "SHARD_BYTES", 8 * 2**20)  # several shards from the tiny model
    monkeypatch.setattr(sys, "argv", ["random_llm.py", str(tiny_llm), str(tmp_path), "--arch", "llama3-tiny"])
    random_llm.main()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    c = model.config
    assert (c.vocab_size, c.num_key_value_heads, c.num_attention_heads, c.tie_word_embeddings) == (128256, 2, 4, False)
    assert model.lm_head.weight.abs().sum() > 0 and model.model.norm.weight.eq(1).all()


def test_encoder_stage_and_text_store_import_without_pyav_or_ray():
    """The GPU machine gets neither (too large to carry): the job's encoder stage and the benchmarks'
    text store must import without them."""
    code = ("import sys; sys.modules.update(av=None, ray=None, decord=None)\n"
            "from pipelines.job import ImageBindStage\nfrom benchmarks.text_store import build_text_store\n"
            "from training import train\nfrom evaluation.generate import generate_and_score")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
