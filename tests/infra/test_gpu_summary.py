"""The GPU check's summary table: each figure beside its goal, and the full-MELD estimate."""

import json

import pytest

from infra.gpu_summary import MELD_CLIPS, MELD_FRAMES, summary


def _write(out, name, record):
    (out / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture
def check_out(tmp_path):
    _write(tmp_path, "env", {"gpu": "NVIDIA H100 80GB HBM3", "gpus": 1, "cuda": "13.0"})
    _write(tmp_path, "encoder", {"batch_size": 32, "runs": [
        {"size": "huge", "dtype": "float32", "clips_per_s": 20.0, "speedup": 1.0, "min_cosine_to_fp32": 1.0, "peak_mb": 7000},
        {"size": "huge", "dtype": "bfloat16", "clips_per_s": 80.0, "speedup": 4.0, "min_cosine_to_fp32": 0.9995, "peak_mb": 4000},
        {"size": "huge", "dtype": "float16", "clips_per_s": 90.0, "speedup": 4.5, "min_cosine_to_fp32": 0.99, "peak_mb": 4000}]})
    _write(tmp_path, "decode", {"frames_per_s": 4000.0, "clips_per_s": 44.0, "workers": 16, "decoder": "OpenCV"})
    _write(tmp_path, "train", {"merg": {"tokens_per_s": 9000, "samples_per_s": 70.0, "batch_size": 16, "peak_mb": 40000},
                               "hf": {"tokens_per_s": 10000, "samples_per_s": 77.0, "batch_size": 16, "peak_mb": 50000}})
    _write(tmp_path, "evaluate", {"merg_examples_per_s": 10.0, "reference_examples_per_s": 2.0, "ratio": 5.0, "batch_size": 32})
    (tmp_path / "asd.log").write_text("loading\nbenchmarks/asd.py: no --device option\n")
    return tmp_path


def _row(text, measure):
    return next(line for line in text.splitlines() if line.startswith(f"| {measure}"))


def test_summary_says_met_or_not_met_beside_each_goal(check_out):
    text = summary(check_out, "llama3-8b")
    assert text.startswith("GPU: NVIDIA H100 80GB HBM3")
    assert _row(text, "encoder stage, ImageBind huge (random init), bfloat16").endswith("| **met** |")
    assert _row(text, "encoder stage, ImageBind huge (random init), float16").endswith("| **not met** |")  # cosine 0.99
    assert _row(text, "QLoRA NF4 + LoRA (all linear), merg").endswith("| **met** |")  # 70 / 6.28 = 11x
    assert "merg 0.90x" in _row(text, "QLoRA NF4 + LoRA (all linear), hf") and "**met**" in _row(text, "QLoRA NF4 + LoRA (all linear), hf")
    assert _row(text, "generate-and-score, merg").endswith("| **not met** |")  # 5x < 8x
    speaker = _row(text, "speaker stage")
    assert "not measured: benchmarks/asd.py: no --device option" in speaker and speaker.endswith("| not measured |")
    assert "not measured: needs speaker stage" in _row(text, "full MELD")


def test_meld_estimate_overlaps_cpu_decode_with_the_gpu_stages(check_out):
    _write(check_out, "asd", {"s3fd_frames_per_s": 8000.0, "talknet_share": 0.2, "faithful_clips_per_s": 50.0, "device": "cuda"})
    row = _row(summary(check_out, "llama3-8b"), "full MELD")
    decode_min = MELD_FRAMES / 4000 / 60
    gpu_min = MELD_FRAMES / 8000 / 0.8 / 60 + MELD_CLIPS / 80.0 / 60  # bf16: the fastest dtype within cosine 0.999
    assert f"{max(decode_min, gpu_min):.1f} min overlapped" in row and f"{decode_min + gpu_min:.1f} min one after another" in row
    assert row.endswith("| **not met** |" if max(decode_min, gpu_min) > 10 else "| **met** |")
    assert _row(summary(check_out, "llama3-8b"), "speaker stage: S3FD").endswith("| **met** |")


def test_quick_summary_judges_nothing(check_out):
    text = summary(check_out, "llama3-tiny", quick=True)
    assert "no goal is judged" in text and "**met**" not in text and "**not met**" not in text


def test_a_variant_the_time_limit_stopped_is_said_not_measured(check_out):
    _write(check_out, "train", {"merg": {"tokens_per_s": 9000, "samples_per_s": 70.0, "batch_size": 16, "peak_mb": 40000}})
    (check_out / "train.log").write_text("dialogues from MELD text\ntimed out after 150 s\n")
    row = _row(summary(check_out, "llama3-8b"), "QLoRA NF4 + LoRA (all linear), hf")
    assert "not measured: timed out after 150 s" in row and row.endswith("| not measured |")
