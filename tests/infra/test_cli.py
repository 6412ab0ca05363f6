from __future__ import annotations

import csv

from typer.testing import CliRunner

from infra.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("version", "data", "models"):
        assert command in result.output
    data_help = runner.invoke(app, ["data", "--help"]).output
    assert "synth" in data_help and "summary" in data_help


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.output.startswith("merg 0.")


def test_summary_on_mini_meld(mini_meld):
    result = runner.invoke(app, ["data", "summary", "--meld-root", str(mini_meld)])
    assert result.exit_code == 0, result.output
    assert "utterances per split x emotion" in result.output
    for reason in ("missing_file", "empty_file", "truncated", "no_audio_stream", "not_mp4", "too_short"):
        assert reason in result.output


def test_summary_missing_column_exits_2(tmp_path):
    with (tmp_path / "train_sent_emo.csv").open("w", newline="") as fh:
        csv.writer(fh).writerow(["Sr No.", "Utterance", "Speaker"])
    result = runner.invoke(app, ["data", "summary", "--meld-root", str(tmp_path), "--splits", "train"])
    assert result.exit_code == 2
    assert "missing required column" in result.output and "Emotion" in result.output


def test_synth_rejects_bad_override(tmp_path):
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path), "--set", "synth.nope=1"])
    assert result.exit_code != 0
    assert "nope" in result.output
