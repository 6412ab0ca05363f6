"""The sweep on Ray: every system on the same pairs, results in the store, resumable, failures recorded."""

import json

import numpy as np
import pytest

from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS
from featurestore.store import Store
from infra.config import EvaluateConfig, MergConfig, PathsConfig


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
