"""Every command fails loudly and briefly: an exception escaping any `merg` command group is one line
("error: merg <command> failed: <why>"), a log file holding the traceback, and exit status 1."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from featurestore.store import Store
from infra.cli import main
from tests.featurestore.test_store_faults import DAMAGE, damage, make_store, read_only_mount
from tests.infra.test_tools import broken_tool


@pytest.fixture(autouse=True)
def log_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "logs"
    monkeypatch.setenv("MERG_LOG_DIR", str(folder))
    return folder


def merg(capsys, *args: str) -> tuple[int, str, str]:
    """Run `merg ARGS` as the console script does: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def assert_one_line_failure(err: str, command: str, log_dir: Path, *why: str) -> str:
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"error: merg {command} failed: "), err
    assert all(w in lines[0] for w in why), lines[0]
    assert "Traceback" not in err and len(lines) == 2, err
    logs = list(log_dir.glob("*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[1] and "Traceback (most recent call last)" in logs[0].read_text()
    return lines[0]


def test_data_group_names_a_tool_that_cannot_start(capsys, tmp_path, monkeypatch, log_dir):
    """The silent failure of the issue: `merg data synth` with an ffmpeg that dies at start-up."""
    monkeypatch.setenv("PATH", f"{broken_tool(tmp_path / 'bin', 'ffmpeg').parent}:/usr/bin:/bin")
    code, _, err = merg(capsys, "data", "synth", "--out", tmp_path / "mini", "--dialogues", 3, "--bank")
    assert code == 1
    assert_one_line_failure(err, "data synth", log_dir, "ffmpeg cannot run", "libblas.so.3", "dpkg --configure -a")
    assert not (tmp_path / "mini").exists()  # checked before any work


def test_verbose_prints_the_traceback_too(capsys, tmp_path, monkeypatch, log_dir):
    monkeypatch.setenv("PATH", f"{broken_tool(tmp_path / 'bin', 'ffmpeg').parent}:/usr/bin:/bin")
    code, _, err = merg(capsys, "--verbose", "data", "synth", "--out", tmp_path / "mini", "--dialogues", 3, "--bank")
    assert code == 1 and "Traceback (most recent call last)" in err and "ToolUnavailable" in err
    assert err.strip().splitlines()[-2].startswith("error: merg data synth failed: ffmpeg cannot run")


def test_data_group_unreadable_input(capsys, tmp_path, log_dir):
    (tmp_path / "meld" / "train_sent_emo.csv").mkdir(parents=True)  # a folder where the CSV should be
    code, _, err = merg(capsys, "data", "summary", "--meld-root", tmp_path / "meld", "--splits", "train")
    assert code == 1
    assert_one_line_failure(err, "data summary", log_dir, "IsADirectoryError", "train_sent_emo.csv")


def test_usage_errors_keep_typers_behaviour(capsys, log_dir):
    code, _, err = merg(capsys, "store", "stats", "--no-such-option")
    assert code == 2 and "No such option" in err and not log_dir.exists()


@pytest.mark.parametrize("kind", DAMAGE)
def test_store_group_names_the_damaged_table(capsys, tmp_path, kind):
    root = make_store(tmp_path / "store")
    damage(root, kind)
    code, out, err = merg(capsys, "store", "stats", "--store", root)
    line = (out + err).strip().splitlines()
    assert code != 0 and len([l for l in line if "error" in l]) == 1 and "Traceback" not in out + err
    message = next(l for l in line if "error" in l)
    assert "the store's 'utterances' table is damaged" in message and ("--version N" in message or kind == "garbage_folder")
    if kind == "truncated_manifest":
        code, out, _ = merg(capsys, "store", "stats", "--store", root, "--version", 2)
        assert code == 0 and "store version 2: 6 utterances" in out


@pytest.mark.parametrize(
    "command", [["store", "query"], ["store", "versions"], ["targets", "build"], ["sweep"], ["report"]]
)
def test_every_reader_names_the_damaged_table_in_one_line(capsys, tmp_path, command):
    root = make_store(tmp_path / "store")
    damage(root, "truncated_manifest")
    code, out, err = merg(capsys, *command, "--store", root)
    errors = [line for line in (out + err).splitlines() if line.startswith("error")]
    assert code != 0 and "Traceback" not in out + err and len(errors) == 1, out + err
    assert "the store's 'utterances' table is damaged" in errors[0] and "--version N (on disk: 1, 2, 3)" in errors[0]


def test_write_commands_refuse_a_read_only_store_and_reads_work(capsys, tmp_path, log_dir):
    root = make_store(tmp_path / "store")
    with read_only_mount(root, tmp_path / "ro") as ro:
        code, out, _ = merg(capsys, "store", "stats", "--store", ro)
        assert code == 0 and "12 utterances" in out
        for command in (["preprocess", "--meld-root", tmp_path, "--no-media"], ["targets", "build", "--kind", "next_utterance"],
                        ["train"], ["sweep"]):  # fmt: skip
            code, _, err = merg(capsys, *command, "--store", ro)
            assert code == 1 and "cannot be written" in err and "Read-only file system" in err, (command, err)
        code, _, err = merg(capsys, "store", "tag", "x", "--store", ro)
        assert code == 1 and "cannot be written" in err


@pytest.mark.parametrize(
    "door, command, options",
    [
        ("training.train", "train", ["--store", "{store}"]),
        ("evaluation.sweep", "sweep", ["--store", "{store}"]),
        ("evaluation.evaluate", "evaluate", ["--model", "m", "--store", "{store}"]),
        ("evaluation.report", "report", ["--store", "{store}", "--out", "{store}/report"]),
        ("infra.models.fetch_embedded_llm", "models fetch", []),
        ("training.build_targets", "targets build", ["--store", "{store}"]),
    ],
)
def test_train_evaluate_and_model_groups_fail_in_one_line(capsys, tmp_path, monkeypatch, log_dir, door, command, options):
    store = make_store(tmp_path / "store")

    def fail(*_, **__):
        raise OSError(5, "Input/output error", "/data/broken-disk/block")

    monkeypatch.setattr(door, fail)
    code, _, err = merg(capsys, *command.split(), *(a.format(store=store) for a in options))
    assert code == 1
    assert_one_line_failure(err, command, log_dir, "OSError", "Input/output error", "/data/broken-disk/block")


def _mount_tmpfs(target: Path, size: str) -> None:
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights): disk-full untested")


@pytest.mark.slow
@pytest.mark.meld_text
def test_disk_full_stops_with_a_space_message_and_a_rerun_completes_exactly_once(capsys, tmp_path, meld_text_dir, log_dir):
    """MELD's 13.7k text rows (7 commits) into an 800 KiB tmpfs: it fills after a few commits."""
    small = tmp_path / "small"
    _mount_tmpfs(small, "800k")
    try:
        args = ["preprocess", "--meld-root", meld_text_dir, "--no-media"]
        code, _, err = merg(capsys, *args, "--store", small / "store")
        assert code == 1
        assert_one_line_failure(err, "preprocess", log_dir, "no space left on device", "run the same command again")
        committed = Store.open(small / "store").query(columns=["key"]).num_rows  # the last committed version opens
        assert 0 < committed < 13708
        subprocess.run(["cp", "-a", str(small / "store"), str(tmp_path / "roomy")], check=True)
    finally:
        subprocess.run(["umount", str(small)], check=True)
    code, out, _ = merg(capsys, *args, "--store", tmp_path / "roomy")
    keys = Store.open(tmp_path / "roomy").query(columns=["key"]).column("key").to_pylist()
    assert code == 0 and len(keys) == len(set(keys)) == 13708


def test_disk_full_while_building_targets_then_a_rerun_on_a_roomier_disk(capsys, tmp_path, log_dir):
    """A store copied onto a tmpfs with 100 KiB to spare; its ~230 KiB of targets do not fit."""
    from featurestore.schema import TARGETS
    from tests.conftest import dialogue_rows

    made = tmp_path / "made"
    Store.open(made, create=True, embedding_dim=32).write_utterances(dialogue_rows(400, 6))
    used_kib = int(subprocess.run(["du", "-sk", str(made)], capture_output=True, text=True, check=True).stdout.split()[0])
    small = tmp_path / "small"
    _mount_tmpfs(small, f"{used_kib + 100}k")
    try:
        subprocess.run(["cp", "-a", str(made), str(small / "store")], check=True)
        code, _, err = merg(capsys, "targets", "build", "--kind", "next_utterance", "--store", small / "store")
        assert code == 1
        assert_one_line_failure(err, "targets build", log_dir, "no space left on device")
        assert Store.open(small / "store").query(columns=["key"]).num_rows == 2400  # the store still opens
        subprocess.run(["cp", "-a", str(small / "store"), str(tmp_path / "roomy")], check=True)
    finally:
        subprocess.run(["umount", str(small)], check=True)
    code, _, _ = merg(capsys, "targets", "build", "--kind", "next_utterance", "--store", tmp_path / "roomy")
    ids = Store.open(tmp_path / "roomy").read_records(TARGETS, columns=["id"]).column("id").to_pylist()
    merg(capsys, "targets", "build", "--kind", "next_utterance", "--store", made)  # the same build, never interrupted
    expected = Store.open(made).read_records(TARGETS, columns=["id"]).column("id").to_pylist()
    assert code == 0 and len(ids) == len(set(ids)) and sorted(ids) == sorted(expected)


@pytest.mark.slow
def test_disk_full_while_storing_evaluation_results_then_a_rerun_after_space_is_freed(capsys, dialogue_store, tiny_llm, tmp_path, log_dir):
    """The store on a tmpfs whose free space a filler file takes: the cell's writes fail, the command
    says so in one line, the store opens at its last version; with the filler deleted the re-run stores
    the cell's outputs and its one result exactly once."""
    from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS

    used_kib = int(subprocess.run(["du", "-sk", str(dialogue_store)], capture_output=True, text=True, check=True).stdout.split()[0])
    small = tmp_path / "small"
    _mount_tmpfs(small, f"{used_kib + 4096}k")  # room for a cell: outputs, progress rows, result
    args = ["evaluate", "--model", tiny_llm, "--store", small / "store", "--limit", "3",
            "--set", "evaluate.emotion_backend=lexicon", "--set", "evaluate.bootstrap_samples=20"]  # fmt: skip
    try:
        subprocess.run(["cp", "-a", str(dialogue_store), str(small / "store")], check=True)
        filler = small / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)  # until the disk is full
        code, _, err = merg(capsys, *args)
        assert code == 1
        assert_one_line_failure(err, "evaluate", log_dir, "no space left on device")
        store = Store.open(small / "store")
        assert store.query(columns=["key"]).num_rows == 64  # the last committed version still opens
        filler.unlink()  # space freed
        code, out, err = merg(capsys, *args)
        assert code == 0, err
        store = Store.open(small / "store")
        outputs = store.read_records(EVAL_OUTPUTS, columns=["cell", "key"]).to_pylist()
        assert len(outputs) == len({(o["cell"], o["key"]) for o in outputs}) == 3
        assert [r["status"] for r in store.read_records(EVAL_RESULTS).to_pylist()] == ["done"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---- issue 27 item 5: messages that were not one clear line ------------------------------------------
def _preprocessed_store(capsys, tmp_path: Path) -> tuple[Path, list[str]]:
    """A text-only store written by two `merg preprocess` runs (three versions), and the arguments that ran them."""
    from tests.pipelines.test_job import write_meld

    meld, store = tmp_path / "meld", tmp_path / "store"
    args = ["preprocess", "--meld-root", meld, "--splits", "train", "--no-media", "--store", store]
    for rows in (1, 2):
        write_meld(meld, "train", [("joy", "positive")] * rows)
        assert merg(capsys, *args)[0] == 0
    return store, args


@pytest.mark.parametrize("command", ["store stats", "store query", "store export", "preprocess"])
def test_a_truncated_data_file_is_named_with_the_versions_to_open(capsys, tmp_path, log_dir, command):
    """Reading rows from a truncated data file (the manifest opens) was a raw `LanceError(IO)`."""
    store, preprocess = _preprocessed_store(capsys, tmp_path)
    damage(store, "truncated_data_file")
    args = {"store stats": ["store", "stats", "--store", store], "store query": ["store", "query", "--store", store],
            "store export": ["store", "export", "--store", store, "--out", tmp_path / "x.parquet"],
            "preprocess": preprocess}[command]  # fmt: skip
    code, _, err = merg(capsys, *args)
    assert code == 1
    line = assert_one_line_failure(err, command, log_dir, "the store's 'utterances' table is damaged", "--version N (on disk: ")
    listed = [int(v) for v in re.search(r"on disk: ([\d, ]+)\)", line).group(1).split(", ")]
    code, out, _ = merg(capsys, "store", "stats", "--store", store, "--version", listed[0])
    assert code == 0 and f"store version {listed[0]}: 1 utterances" in out  # a version the message points to opens


@pytest.mark.parametrize(
    "case, status, why",
    [
        ("bad_where", 2, ["the filter 'duration >>> 2'", "sql parser error"]),
        ("unknown_emotion", 2, ["not a MELD emotion label: 'happyish'", "neutral, joy, surprise"]),
        ("missing_store", 2, ["no merg store at"]),
        ("store_is_a_file_read", 2, ["is a file, not a merg store folder"]),
        ("store_is_a_file_write", 2, ["is a file, not a folder"]),
        ("garbage_store", 1, ["the store's 'utterances' table is damaged"]),
    ],
)
def test_input_problems_are_one_line_with_the_log(capsys, tmp_path, log_dir, case, status, why):
    """A bad filter, a label MELD does not have, a missing store, a file where the store folder should
    be and a garbage store: one line saying so (not a 4-line box, a raw Lance error or "0 matching"), and the log."""
    store = make_store(tmp_path / "store")
    (tmp_path / "a_file").write_text("not a store")
    if case == "garbage_store":
        damage(store, "garbage_folder")
    args = {
        "bad_where": ["store", "query", "--where", "duration >>> 2", "--store", store],
        "unknown_emotion": ["store", "query", "--emotion", "joy,happyish", "--store", store],
        "missing_store": ["store", "stats", "--store", tmp_path / "nothing"],
        "store_is_a_file_read": ["store", "stats", "--store", tmp_path / "a_file"],
        "store_is_a_file_write": ["preprocess", "--meld-root", tmp_path, "--store", tmp_path / "a_file"],
        "garbage_store": ["store", "stats", "--store", store],
    }[case]
    code, out, err = merg(capsys, *args)
    assert code == status and "matching" not in out
    line = assert_one_line_failure(err, " ".join(a for a in args[:2] if not str(a).startswith("-")), log_dir, *why)
    assert "read commands still work" not in line and ".rs:" not in line


def test_train_on_a_store_without_its_data_stops_before_loading_a_model(capsys, tmp_path, log_dir, monkeypatch):
    """It used to load the model (about a minute) before finding no targets, then print a 4-line box."""
    Store.open(tmp_path / "store", create=True, embedding_dim=8)

    def no_model(*_, **__):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr("training.trainer.load_llm", no_model)
    code, _, err = merg(capsys, "train", "--store", tmp_path / "store", "--set", f"paths.runs={tmp_path / 'runs'}")
    assert code == 2
    assert_one_line_failure(err, "train", log_dir, "no 'next_utterance' targets", "merg targets build --kind next_utterance")


@pytest.mark.slow
def test_sigint_and_sigterm_during_training_say_where_it_stopped_and_how_to_resume(dialogue_store, tiny_llm, tmp_path, log_dir):
    """`merg train` stopped by SIGINT or SIGTERM exited 130/143 without a word; now one line says the
    step it reached and to resume with --resume, the log the rest. (Both runs at once, in subprocesses.)"""
    import os
    import shutil
    import signal
    import sys
    import time

    runs = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        store = shutil.copytree(dialogue_store, tmp_path / f"store-{number}")
        command = [sys.executable, "-m", "infra.cli", "train", "--store", str(store), "--model", str(tiny_llm),
                   "--modality", "text", "--name", "sig", "--max-steps", "100000", "--set", f"paths.runs={tmp_path / str(number)}",
                   "--set", "train.max_length=128", "--set", "train.save_every=2", "--set", "train.eval_every=100000"]  # fmt: skip
        env = {**os.environ, "MERG_LOG_DIR": str(log_dir / str(number))}
        with (tmp_path / f"stderr-{number}").open("w") as stderr:  # a file: a full pipe would stall the run
            runs[number] = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        for number, job in runs.items():
            metrics = tmp_path / str(number) / "sig" / "metrics.jsonl"
            deadline = time.time() + 600
            while job.poll() is None and time.time() < deadline and len(metrics.read_text().splitlines() if metrics.exists() else []) < 3:
                time.sleep(0.2)
            assert job.poll() is None and time.time() < deadline, (tmp_path / f"stderr-{number}").read_text()[-2000:]
            job.send_signal(number)
        for number, job in runs.items():
            job.wait(timeout=120)
            err = (tmp_path / f"stderr-{number}").read_text()
            lines = err.strip().splitlines()[-2:]
            assert job.returncode == 128 + number, err[-2000:]
            assert re.match(rf"error: merg train failed: interrupted at step (?:[3-9]|\d{{2,}}) \({number.name}\); resume with --resume \(from checkpoint step-\d+\)$", lines[0]), err[-2000:]
            assert "full traceback in" in lines[1]
    finally:
        for job in runs.values():
            if job.poll() is None:
                job.kill()
                job.wait()
