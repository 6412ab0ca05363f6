"""The training and evaluation commands: thin layers, clear errors, end to end on a tiny model."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from infra.cli import app

runner = CliRunner()


def test_help_lists_the_training_and_evaluation_commands():
    output = runner.invoke(app, ["--help"]).output
    for command in ("targets", "train", "evaluate", "sweep", "report"):
        assert command in output


def test_targets_train_evaluate_report(dialogue_store, tiny_llm, tmp_path):
    store = shutil.copytree(dialogue_store, tmp_path / "store")
    result = runner.invoke(app, ["targets", "build", "--store", str(store), "--kind", "next_utterance"])
    assert result.exit_code == 0 and "train" in result.output, result.output
    train = ["train", "--store", str(store), "--model", str(tiny_llm), "--modality", "text", "--name", "cli",
             "--max-steps", "1", "--set", f"paths.runs={tmp_path / 'runs'}", "--set", "train.max_length=128"]  # fmt: skip
    result = runner.invoke(app, train)
    assert result.exit_code == 0 and "training done" in result.output, result.output
    evaluate = ["evaluate", "--run", str(tmp_path / "runs" / "cli"), "--store", str(store), "--limit", "3",
                "--set", "evaluate.emotion_backend=lexicon", "--set", "evaluate.bootstrap_samples=20"]  # fmt: skip
    result = runner.invoke(app, evaluate)
    assert result.exit_code == 0 and "BERTScore F1" in result.output, result.output
    assert "1 cells evaluated" in result.output
    assert "0 cells evaluated, 1 already done" in runner.invoke(app, evaluate).output  # not evaluated twice
    result = runner.invoke(app, ["report", "--store", str(store), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0 and (tmp_path / "report" / "report.html").is_file(), result.output


def test_clear_errors(dialogue_store, tmp_path):
    result = runner.invoke(app, ["evaluate", "--store", str(dialogue_store)])
    assert result.exit_code != 0 and "nothing to evaluate" in result.output
    result = runner.invoke(app, ["report", "--store", str(dialogue_store), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "merg sweep" in result.output
    result = runner.invoke(app, ["train", "--store", str(dialogue_store), "--model", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "no HF model folder" in result.output


@pytest.mark.slow
def test_probe_prints_the_table_and_rejects_unknown_features(dialogue_store, tmp_path):
    store = shutil.copytree(dialogue_store, tmp_path / "store")
    result = runner.invoke(app, ["probe", "--store", str(store), "--feature", "fused_emb"])
    assert result.exit_code == 0 and "emotion probe" in result.output and "fused_emb" in result.output, result.output
    result = runner.invoke(app, ["probe", "--store", str(store), "--feature", "smell"])
    assert result.exit_code != 0 and "unknown feature" in result.output
