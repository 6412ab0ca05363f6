"""The sweep on Ray: every system on the same pairs, results in the store, resumable mid-cell (kills of the
driver, of a cell's worker, SIGTERM), failures recorded, cell identity."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS
from featurestore.store import Store
from infra.config import EvaluateConfig, MergConfig, PathsConfig, TargetsConfig


def _config(store, tiny_llm, tiny_runs, report_dir) -> MergConfig:
    systems = [
        {"name": "pretrained", "model": str(tiny_llm), "modality": "text", "quantization": "none"},
        {"name": "text run", "run": str(tiny_runs / "text")},
        {"name": "mm run", "run": str(tiny_runs / "mm")},
        {"name": "impossible", "model": str(tiny_llm), "modality": "audio"},  # no projector: fails, alone
    ]
    evaluate = EvaluateConfig(sweep="t", systems=systems, limit=4, bootstrap_samples=50, batch_size=4,
                              emotion_backend="lexicon", report_dir=report_dir)  # fmt: skip
    return MergConfig(paths=PathsConfig(store=store), evaluate=evaluate)


def test_sweep_is_resumable_and_records_failures(eval_store, tiny_llm, tiny_runs, ray_session, tmp_path):
    from evaluation import report, sweep

    config = _config(eval_store, tiny_llm, tiny_runs, tmp_path / "report")
    first = sweep(config)
    assert len(first.done) == 3 and len(first.failed) == 1
    assert "has no projector" in next(iter(first.failed.values()))
    store = Store.open(eval_store)
    results = store.read_records(EVAL_RESULTS).to_pylist()
    assert sorted(r["status"] for r in results) == ["done", "done", "done", "failed"]
    outputs = store.read_records(EVAL_OUTPUTS)
    keys_by_cell = {}
    for cell, key in zip(outputs.column("cell").to_pylist(), outputs.column("key").to_pylist()):
        keys_by_cell.setdefault(cell, set()).add(key)
    assert len(keys_by_cell) == 3 and len({frozenset(k) for k in keys_by_cell.values()}) == 1  # the same pairs
    metrics = json.loads(next(r for r in results if r["system"] == "mm run")["metrics"])
    for name in ("ppl", "dist2", "bertscore_f1", "emotion", "sentiment", "empathy", "ref_self_ppl", "ref_empathy"):
        assert name in metrics
    lo, hi = metrics["bertscore_f1"]["ci"]
    assert lo <= metrics["bertscore_f1"]["value"] <= hi

    again = sweep(config)  # finished cells are skipped, the failed one is tried again
    assert again.skipped == 3 and len(again.failed) == 1 and not again.done
    assert store.read_records(EVAL_OUTPUTS).num_rows == outputs.num_rows == 12

    files = report(store, "t", tmp_path / "report")
    page = files.html.read_text()
    assert "<table>" in page and "mm run" in page and "metrics.png" in page and "emotion_confusion.png" in page
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files.images)
    markdown = files.markdown.read_text()
    assert "| Method | Model |" in markdown and "impossible" in markdown  # the failed cell is listed


_KILLED_AFTER_OUTPUTS = """
import os, signal, sys
from featurestore.schema import EVAL_OUTPUTS
from featurestore.store import Store
from infra.config import MergConfig

write = Store.write_records

def write_then_die(self, name, rows):  # SIGKILL between a cell's outputs commit and its result commit
    written = write(self, name, rows)
    if name == EVAL_OUTPUTS:
        os.kill(os.getpid(), signal.SIGKILL)
    return written

Store.write_records = write_then_die
from evaluation import evaluate
evaluate(MergConfig.model_validate_json(open(sys.argv[1]).read()))
"""


@pytest.mark.slow
def test_killed_between_a_cells_writes_a_rerun_stores_each_row_once(eval_store, tiny_llm, tmp_path):
    """SIGKILL after a cell's outputs are committed but before its result is: the store keeps the
    outputs, the cell is not `done`, and the re-run completes it without a duplicate output or result."""
    import subprocess
    import sys

    from evaluation import evaluate

    systems = [{"name": "pretrained", "model": str(tiny_llm), "modality": "text", "quantization": "none"}]
    config = MergConfig(paths=PathsConfig(store=eval_store), evaluate=EvaluateConfig(
        sweep="k", systems=systems, presets=["default"], limit=3, bootstrap_samples=20, batch_size=4,
        emotion_backend="lexicon", report_dir=tmp_path / "report"))  # fmt: skip
    (tmp_path / "config.json").write_text(config.model_dump_json())
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_OUTPUTS, str(tmp_path / "config.json")],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = Store.open(eval_store)
    assert store.read_records(EVAL_OUTPUTS).num_rows == 3 and store.read_records(EVAL_RESULTS).num_rows == 0

    rerun = evaluate(config)
    assert len(rerun.done) == 1 and rerun.skipped == 0
    outputs = store.read_records(EVAL_OUTPUTS, columns=["cell", "key"]).to_pylist()
    assert len(outputs) == len({(o["cell"], o["key"]) for o in outputs}) == 3
    assert [r["status"] for r in store.read_records(EVAL_RESULTS).to_pylist()] == ["done"]
    assert evaluate(config).skipped == 1  # and a third run has nothing left to do


def test_cell_ids_follow_what_changes_the_numbers_not_the_sweep_name(eval_store, tiny_llm, tiny_runs, tmp_path):
    """Renaming a sweep reuses every cell; training the emotion classifier (under `auto`) or rebuilding the
    targets with other content gives new ids, so exactly those cells run again."""
    from safetensors.numpy import save_file

    from evaluation.metrics.emotion import MELD_CLASSIFIER_DIR
    from evaluation.sweep import _plan
    from featurestore.schema import SWEEP_CELLS, TARGETS

    config = _config(eval_store, tiny_llm, tiny_runs, tmp_path / "report")
    config = config.model_copy(update={"paths": PathsConfig(store=eval_store, model_cache=tmp_path / "cache"),
                                       "evaluate": config.evaluate.model_copy(update={"emotion_backend": "auto"})})  # fmt: skip
    store = Store.open(eval_store)
    todo, first = _plan(config, store)
    store.write_records(EVAL_RESULTS, [dict(cell=i, sweep="t", status="done") for i in first.cell_ids])
    renamed = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"sweep": "t-v2"})})
    todo, again = _plan(renamed, store)
    assert again.cell_ids == first.cell_ids and not todo and again.skipped == len(first.cell_ids)
    assert {r["sweep"] for r in store.read_records(SWEEP_CELLS).to_pylist()} == {"t", "t-v2"}

    trained = tmp_path / "cache" / MELD_CLASSIFIER_DIR
    trained.mkdir(parents=True)
    save_file({"coef": np.zeros((7, 4), np.float32)}, trained / "classifier.safetensors")
    (trained / "meta.json").write_text("{}")
    todo, with_classifier = _plan(config, store)
    assert len(todo) == len(first.cell_ids) and not set(with_classifier.cell_ids) & set(first.cell_ids)

    dev = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"splits": ["dev"]})})
    dev_ids = _plan(dev, store)[1].cell_ids
    row = store.targets("next_utterance", split="test").slice(0, 1).to_pylist()[0]
    store.write_records(TARGETS, [dict(row, target=row["target"] + " (rebuilt)")])
    _, rebuilt = _plan(config, store)
    assert not set(rebuilt.cell_ids) & set(with_classifier.cell_ids)
    assert _plan(dev, store)[1].cell_ids == dev_ids  # the dev cells' pairs did not change
    store.write_records(TARGETS, [dict(row)])  # back to the old content: the old ids again
    assert _plan(config, store)[1].cell_ids == with_classifier.cell_ids


# ---- cells that resume mid-way ---------------------------------------------------------------------
CHUNK = 4  # examples per commit (two batches of 2): small, so a sweep of 34 pairs has 9 chunks per cell


def _resume_config(store, tiny_llm, report_dir) -> MergConfig:
    """One system, a greedy and a seeded-sampling preset, small batches and chunks."""
    systems = [{"name": "pretrained", "model": str(tiny_llm), "modality": "text", "quantization": "none"}]
    evaluate = EvaluateConfig(sweep="resume", systems=systems, presets=["default", "sample"], batch_size=2, chunk_size=CHUNK,
                              bootstrap_samples=50, emotion_backend="lexicon", report_dir=report_dir)  # fmt: skip
    return MergConfig(paths=PathsConfig(store=store), evaluate=evaluate)


def _finished(store) -> tuple[dict, dict]:
    """Each cell's outputs (key -> row without its timestamp) and metrics."""
    rows = Store.open(store).read_records(EVAL_OUTPUTS).to_pylist()
    outputs = {}
    for row in rows:
        row.pop("created_at")
        outputs.setdefault(row["cell"], {})[row["key"]] = row
    results = {r["cell"]: json.loads(r["metrics"]) for r in Store.open(store).read_records(EVAL_RESULTS, "status = 'done'").to_pylist()}
    return outputs, results


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory, tiny_llm, ray_session):
    """A store of 34 test pairs and the outputs and metrics of an uninterrupted sweep over it."""
    from evaluation import sweep
    from tests.conftest import dialogue_rows
    from training import build_targets

    template = tmp_path_factory.mktemp("resume") / "store"
    store = Store.open(template, create=True, embedding_dim=32)
    store.write_utterances(dialogue_rows(8, 6, splits=("test",)))
    build_targets(store, TargetsConfig(kind="next_utterance", splits=["test"]), template)
    baseline = shutil.copytree(template, template.with_name("baseline"))
    report = sweep(_resume_config(baseline, tiny_llm, template.with_name("report")))
    assert len(report.done) == 2 and not report.resumed
    return template, _finished(baseline)


def _stored_by_cell(store) -> dict[str, int]:
    cells = Store.open(store).read_records(EVAL_OUTPUTS, columns=["cell"]).column("cell").to_pylist()
    return {c: cells.count(c) for c in set(cells)}


def _wait_for(condition, timeout: float = 600, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (from /proc), to stop exactly what a test started."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _assert_same_as_uninterrupted(store, baseline) -> None:
    outputs, results = _finished(store)
    assert outputs == baseline[0]  # every reply, score and per-pair metric, greedy and seeded sampling alike
    assert results == baseline[1]


@pytest.mark.slow
def test_sigkill_of_the_sweep_driver_resumes_each_cell_losing_at_most_a_chunk(resume_case, tiny_llm, tmp_path):
    """`merg sweep` (its whole process group, Ray included) is SIGKILLed at a random moment once a chunk is
    stored; `merg sweep --status` read the running cells from the store before. The re-run reuses every stored
    example, recomputes at most the one chunk each cell had in flight, and ends with the uninterrupted run's
    outputs and metrics."""
    import os
    import random
    import signal
    import subprocess
    import sys

    import yaml
    from typer.testing import CliRunner

    from evaluation import sweep
    from evaluation.sweep import status_lines, sweep_status
    from infra.cli import app

    template, baseline = resume_case
    store = shutil.copytree(template, tmp_path / "store")
    config = _resume_config(store, tiny_llm, tmp_path / "report")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "infra.cli", "sweep", "-c", str(tmp_path / "sweep.yaml")], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        _wait_for(lambda: max(_stored_by_cell(store).values(), default=0) >= CHUNK, what="a stored chunk")
        time.sleep(random.uniform(0, 1.5))
        states = sweep_status(Store.open(store), "resume")  # what `merg sweep --status` prints, while the sweep runs
        lines = status_lines("resume", states)
        assert lines[0].startswith("sweep resume: 2 cells:") and "running" in lines[0]
        running = [s for s in states if s.state == "running"]
        assert running and all(s.total == 34 for s in running) and any(f"/34 examples" in line for line in lines[1:])
        status = CliRunner().invoke(app, ["sweep", "-c", str(tmp_path / "sweep.yaml"), "--status"])
        assert status.exit_code == 0 and "sweep resume: 2 cells:" in status.output and "examples" in status.output, status.output
        tree = _descendants(driver.pid)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        for pid in [driver.pid, *locals().get("tree", [])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    assert "sweep resume: 2 cells:" in (tmp_path / "driver.log").read_text()  # the driver's own progress lines
    before = _stored_by_cell(store)
    assert before and all(n % 2 == 0 for n in before.values())  # whole batches only

    rerun = sweep(config)
    assert not rerun.failed and rerun.skipped + len(rerun.done) == 2
    resumed = {cell: r for cell, r in rerun.resumed.items()}
    assert any(r["reused"] for r in resumed.values()), "no cell resumed"
    for cell, r in resumed.items():
        assert r["reused"] == before.get(cell, 0) and r["redone"] <= 1  # at most the chunk in flight is done again
    _assert_same_as_uninterrupted(store, baseline)
    assert sweep(config).skipped == 2
    assert status_lines("resume", sweep_status(Store.open(store), "resume"))[0] == "sweep resume: 2 cells: 0 done, 2 reused, 0 failed, 0 running"


@pytest.mark.slow
def test_sigkill_of_a_cells_worker_is_retried_and_resumes_losing_at_most_a_chunk(resume_case, tiny_llm, tmp_path):
    """The Ray worker running a cell (its pid read from the cell's progress row) is SIGKILLed at a random moment
    after a chunk is stored: Ray runs the cell again, which reuses the stored examples, recomputes at most the
    chunk in flight, and ends with the uninterrupted run's outputs and metrics."""
    import os
    import random
    import signal
    import threading

    from evaluation import sweep
    from featurestore.schema import CELL_PROGRESS

    template, baseline = resume_case
    store = shutil.copytree(template, tmp_path / "store")
    killed, stop = {}, threading.Event()

    def kill_a_worker() -> None:
        while not stop.is_set():
            rows = Store.open(store).read_records(CELL_PROGRESS).to_pylist()
            row = next((r for r in rows if r["status"] == "running" and (r["done"] or 0) >= CHUNK and r["pid"] != os.getpid()), None)
            if row:
                time.sleep(random.uniform(0, 1.0))
                killed[row["cell"]] = _stored_by_cell(store)[row["cell"]]
                os.kill(row["pid"], signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    try:
        report = sweep(_resume_config(store, tiny_llm, tmp_path / "report"))
    finally:
        stop.set()
        killer.join()
    assert killed, "no running cell was seen"
    (cell, stored_at_kill), = killed.items()
    assert not report.failed and len(report.done) == 2
    resumed = report.resumed[cell]
    assert resumed["attempt"] == 2 and resumed["reused"] >= stored_at_kill and resumed["redone"] <= 1
    _assert_same_as_uninterrupted(store, baseline)


@pytest.mark.slow
def test_sigterm_stores_the_finished_batches_before_a_cell_stops(resume_case, tiny_llm, tmp_path):
    """`merg evaluate` gets SIGTERM mid-cell: it stores the batches it finished (not only whole chunks), marks
    the cell interrupted, says so in one line, and the next run completes the cell from there."""
    import signal
    import subprocess
    import sys

    import yaml

    from evaluation import evaluate
    from featurestore.schema import CELL_PROGRESS

    template, _ = resume_case
    store = shutil.copytree(template, tmp_path / "store")
    config = _resume_config(store, tiny_llm, tmp_path / "report")
    config.evaluate.presets = ["default"]
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    process = subprocess.Popen([sys.executable, "-m", "infra.cli", "evaluate", "-c", str(tmp_path / "evaluate.yaml")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _wait_for(lambda: sum(_stored_by_cell(store).values()) >= CHUNK, what="a stored chunk")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130 and "every finished batch is stored" in output, output[-3000:]
    (progress,) = Store.open(store).read_records(CELL_PROGRESS).to_pylist()
    stored = sum(_stored_by_cell(store).values())
    assert progress["status"] == "interrupted" and "SIGTERM" in progress["error"] and progress["done"] == stored and stored % 2 == 0
    report = evaluate(config)
    assert len(report.done) == 1 and report.resumed and next(iter(report.resumed.values()))["reused"] == stored
    assert sum(_stored_by_cell(store).values()) == 34


def test_cell_ids_cover_preset_parameters_the_whole_adapter_and_the_base_weights(eval_store, tiny_llm, tiny_runs, tmp_path, monkeypatch):
    """A preset's settings changed in code (not its name), `lora_alpha` in a run's adapter_config.json, or the
    base model's weights each give the affected cells new ids; file digests are cached by size and mtime."""
    import os

    from evaluation.evaluate import _digests
    from evaluation.generate import PRESETS, Preset
    from evaluation.sweep import _plan

    monkeypatch.setenv("MERG_DIGEST_CACHE", str(tmp_path / "digests.json"))
    base = shutil.copytree(tiny_llm, tmp_path / "base")
    run = shutil.copytree(tiny_runs / "text", tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(info, model=str(base))))
    systems = [{"name": "pretrained", "model": str(tiny_llm), "modality": "text", "quantization": "none"}, {"name": "run", "run": str(run)}]
    config = MergConfig(paths=PathsConfig(store=eval_store), evaluate=EvaluateConfig(
        sweep="ids", systems=systems, presets=["default", "reference"], emotion_backend="lexicon"))  # fmt: skip
    store = Store.open(eval_store)
    ids = lambda: {(c.system.name, c.preset): i for i, c in _plan(config, store)[0]}  # noqa: E731 (nothing is done: every cell)
    first = ids()

    monkeypatch.setitem(PRESETS, "reference", Preset(max_new_tokens=12, first_sentence=True))  # 25 -> 12 new tokens
    changed = ids()
    assert {k for k in first if first[k] != changed[k]} == {("pretrained", "reference"), ("run", "reference")}
    monkeypatch.setitem(PRESETS, "reference", Preset(max_new_tokens=25, first_sentence=True))
    assert ids() == first  # the same parameters: the same cells

    adapter_config = run / "adapter" / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps(dict(settings, lora_alpha=settings["lora_alpha"] * 2)))
    retuned = ids()
    assert {k for k in first if first[k] != retuned[k]} == {("run", "default"), ("run", "reference")}

    weights = base / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the base model's weights, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _digests.clear()  # a new process: only the digest cache file remains
    assert ids() == retuned  # same size and mtime: the cached digest (not read again, by design)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    rebased = ids()
    assert {k for k in first if retuned[k] != rebased[k]} == {("run", "default"), ("run", "reference")}
