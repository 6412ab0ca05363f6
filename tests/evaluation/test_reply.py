"""`merg reply` end to end: a generated clip through the job's stages into tiny trained runs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from evaluation.reply import ReplyError, Replier, default_next_speaker, parse_history
from featurestore.store import Store
from infra.config import TargetsConfig
from pipelines.imagebind import SIZES
from tests.conftest import dialogue_rows, train_config

DIM = SIZES["small"].out_embed_dim  # the default encoder (ImageBind small, random-init:0)
HISTORY = ["Rachel: I got the job!", "Ross: You did? That is wonderful news."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llm) -> dict[str, Path]:
    """A store embedded 'by' the default encoder, and a multimodal and a text-only run trained on it."""
    from training import build_targets, train

    root = tmp_path_factory.mktemp("reply")
    store = Store.open(root / "store", create=True, embedding_dim=DIM)
    rows = dialogue_rows(8, 3, dim=DIM, splits=("train",) * 6 + ("dev", "test"))
    for name, value in (("encoder", "imagebind-small"), ("encoder_checkpoint", "random-init:0"), ("fusion", "mean_l2")):
        rows = rows.append_column(name, pa.array([value] * rows.num_rows))
    store.write_utterances(rows)
    build_targets(store, TargetsConfig(kind="next_utterance"), Path("."))
    for name, modality in (("mm", "audio+video"), ("text", "text")):
        train(train_config(root / "store", root / "runs", tiny_llm, name=name, modality=modality, max_steps=1,
                           eval_every=1, save_every=1, quantization="none"))  # fmt: skip
    return {"mm": root / "runs" / "mm", "text": root / "runs" / "text"}


def _clip(mini_meld: Path, fault: str | None) -> Path:
    """A generated clip without a fault, or with the named one (the generator's ground truth says)."""
    truth = [json.loads(line) for line in (mini_meld / "ground_truth.jsonl").read_text().splitlines()]
    for row in truth:
        if row.get("clip") and row.get("fault") == fault and row.get("has_audio") and (mini_meld / row["clip"]).exists():
            return mini_meld / row["clip"]
    pytest.skip(f"no clip with fault {fault} in the generated mini-MELD")


def test_history_parsing_and_default_next_speaker():
    assert parse_history("Rachel: hi\\nRoss: hello") == ["Rachel: hi", "Ross: hello"]
    assert default_next_speaker(HISTORY) == "Rachel"
    assert default_next_speaker(["Joey: How you doin'?"]) == "Friend"
    with pytest.raises(ReplyError):
        parse_history(" \n ")


@pytest.mark.slow
def test_reply_on_a_generated_clip_uses_the_jobs_stages(runs, mini_meld):
    replier = Replier(runs["mm"])
    result = replier(HISTORY, clip=_clip(mini_meld, fault=None), speaker="Rachel")
    assert result.used == "fused_emb" and result.modalities == {"audio": True, "video": True}
    assert result.encoder == "imagebind-small" and result.encoder_checkpoint == "random-init:0"
    assert result.speaker_box is None or len(result.speaker_box) == 4
    assert isinstance(result.reply, str) and result.next_speaker == "Rachel"
    assert not [n for n in result.notes if "settings other than" in n]
    json.loads(result.to_json())

    with pytest.raises(ReplyError, match="allow-text-only"):
        replier(HISTORY)  # a multimodal run without a clip
    with pytest.raises(ReplyError, match="no clip at"):
        replier(HISTORY, clip=mini_meld / "../../etc/nothing.mp4", allow_text_only=True)
    not_a_video = _clip(mini_meld, fault="not_a_video")
    with pytest.raises(ReplyError, match="gave no audio or video"):
        replier(HISTORY, clip=not_a_video)
    fallback = replier(HISTORY, clip=not_a_video, allow_text_only=True)
    assert fallback.used == "text" and any(n.startswith("text only") for n in fallback.notes)


@pytest.mark.slow
def test_text_only_run_needs_no_clip(runs):
    result = Replier(runs["text"])(HISTORY, speaker="Rachel")
    assert result.used == "text" and result.clip is None and result.modality == "text"


@pytest.mark.slow
def test_cli_reply_prints_json_and_one_line_errors(runs, mini_meld):
    from typer.testing import CliRunner

    from infra.cli import app

    runner = CliRunner()
    history = "Rachel: I got the job!\\nRoss: You did?"
    ok = runner.invoke(app, ["reply", "--run", str(runs["mm"]), "--clip", str(_clip(mini_meld, fault=None)), "--history", history, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["used"] == "fused_emb"  # logs go to stderr: stdout is the JSON alone
    missing = runner.invoke(app, ["reply", "--run", str(runs["mm"]), "--history", history])
    assert missing.exit_code == 2 and "error:" in missing.output and "--allow-text-only" in missing.output
    text = runner.invoke(app, ["reply", "--run", str(runs["text"]), "--history", history, "--speaker", "Rachel"])
    assert text.exit_code == 0 and text.stdout.startswith("Rachel:") and "used text" in text.stdout


def test_cli_reply_names_a_directory_given_as_the_clip(tmp_path):
    """The clip is checked before the run loads, and the message says what is wrong with it."""
    from typer.testing import CliRunner

    from infra.cli import app

    result = CliRunner().invoke(app, ["reply", "--run", str(tmp_path / "no-run"), "--clip", str(tmp_path), "--history", "Ross: hi"])
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # (other stderr lines: library logs)
    assert len(errors) == 1 and "is a directory" in errors[0] and "no clip at" not in errors[0]


def test_cli_reply_json_errors_keep_stdout_json(tmp_path):
    """With --json, stdout holds JSON whatever happens ({"error": ...} on failure); the line goes to stderr."""
    from typer.testing import CliRunner

    from infra.cli import app

    for extra in (["--clip", str(tmp_path)], []):  # a bad clip, then a run that is not there
        result = CliRunner().invoke(app, ["reply", "--run", str(tmp_path / "no-run"), "--history", "Ross: hi", "--json", *extra])
        assert result.exit_code == 2
        error = json.loads(result.stdout)["error"]
        assert error and f"error: merg reply failed: {error}" in result.stderr.splitlines()


@pytest.mark.slow
def test_reply_fits_an_over_long_history_to_the_run_and_says_so(runs):
    """A 50,000-character history: the oldest lines are dropped until the prompt leaves the preset's
    reply budget within the run's max_length (as training fit its prompts), and the output says so;
    a last line too long on its own is refused in one line."""
    from typer.testing import CliRunner

    from infra.cli import app

    history = [f"{('Rachel', 'Ross')[i % 2]}: this is line {i} of a very long talk." for i in range(1200)]
    assert len("\n".join(history)) > 50_000
    result = Replier(runs["text"])(history, speaker="Rachel")
    note = next(n for n in result.notes if "history lines were left out" in n)
    assert "max_length 128 with 40 tokens kept for the reply" in note  # the run's max_length, the default preset's budget
    dropped = int(note.split()[2])  # a 128-token run with a 40-token reply budget keeps only the newest line or few
    assert 1100 < dropped <= 1199 and note.startswith(f"the oldest {dropped} of 1200 history lines")

    runner = CliRunner()
    shown = runner.invoke(app, ["reply", "--run", str(runs["text"]), "--history", "\\n".join(history), "--speaker", "Rachel"])
    assert shown.exit_code == 0 and "history lines were left out" in shown.stdout
    refused = runner.invoke(app, ["reply", "--run", str(runs["text"]), "--history", "Ross: " + "word " * 300])
    assert refused.exit_code == 2 and "does not fit the run: even the last history line alone" in " ".join(refused.output.split())
    with pytest.raises(ReplyError, match="makes a [0-9]+-token prompt, over the 88 tokens") as refusal:
        Replier(runs["text"])(history + ["Ross: " + "word " * 300])
    assert "\n" not in str(refusal.value)
