"""`sweep(config)`: every cell of a grid (systems x decoding presets x splits) as a Ray task.

    report = sweep(load_config("configs/sweeps/demo.yaml"))

Cells run in parallel on the Ray cluster (`evaluate.ray_address`, or a local Ray), each with
`evaluate.cpus_per_cell` CPUs and `evaluate.gpus_per_cell` GPUs, generation and metrics batched inside.
The driver writes each finished cell's per-example outputs and aggregates into the store's
`eval_outputs` / `eval_results` tables as it arrives. A cell already stored as done (same id: system,
preset, split and every setting that changes its numbers) is skipped; a cell that fails is stored as
`failed` with its error and the sweep goes on; a re-run retries only what is not done.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field

from evaluation.evaluate import Cell, evaluate_cell
from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS
from featurestore.store import Store, build_filter
from infra.config import MergConfig
from infra.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    sweep: str
    cells: int
    skipped: int = 0
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> error
    seconds: float = 0.0


def grid(config: MergConfig) -> list[Cell]:
    ec = config.evaluate
    if not ec.systems:
        raise ValueError("the sweep has no systems: list them under evaluate.systems (see configs/sweeps/)")
    return [Cell(ec.sweep, system, preset, split) for system in ec.systems for preset in ec.presets for split in ec.splits]


def _run_cell(cell: Cell, config: MergConfig, threads: int) -> tuple[list[dict], dict]:
    import torch

    torch.set_num_threads(max(1, threads))
    return evaluate_cell(cell, config)


def _failure(cell: Cell, config: MergConfig, error: str) -> dict:
    return dict(
        cell=cell.id(config.evaluate), sweep=cell.sweep, system=cell.system.name, model=cell.system.model,
        modality=cell.system.modality, run=str(cell.system.run) if cell.system.run else None, preset=cell.preset,
        split=cell.split, target=config.evaluate.target, status="failed", error=error[-4000:], examples=0,
        config_hash=config.fingerprint(),
    )  # fmt: skip


def sweep(config: MergConfig) -> SweepReport:
    import ray

    from infra.runtime import init_ray

    ec = config.evaluate
    started = time.perf_counter()
    store = Store.open(config.paths.store)
    cells = grid(config)
    report = SweepReport(ec.sweep, len(cells))
    done = set()
    if not ec.force:
        finished = store.read_records(EVAL_RESULTS, build_filter(status="done"), columns=["cell"])
        done = set(finished.column("cell").to_pylist())
    todo = [c for c in cells if c.id(ec) not in done]
    report.skipped = len(cells) - len(todo)
    log.info("sweep %s: %d cells, %d already done", ec.sweep, len(cells), report.skipped)
    if todo:
        init_ray(ec.ray_address, ec.num_cpus)
        remote = ray.remote(num_cpus=ec.cpus_per_cell, num_gpus=ec.gpus_per_cell, max_retries=0)(_run_cell)
        pending = {remote.remote(cell, config, int(ec.cpus_per_cell)): cell for cell in todo}
        with progress_bar(f"sweep {ec.sweep}", len(todo)) as advance:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(ready[0])
                try:
                    rows, result = ray.get(ready[0])
                except Exception as exc:  # a failing cell is recorded; the sweep goes on
                    cause = getattr(exc, "cause", None) or exc
                    error = "".join(traceback.format_exception_only(type(cause), cause)).strip()
                    log.error("cell %s (%s / %s / %s) failed: %s", cell.id(ec), cell.system.name, cell.preset, cell.split, error)
                    store.write_records(EVAL_RESULTS, [_failure(cell, config, error)])
                    report.failed[cell.id(ec)] = error
                else:
                    store.write_records(EVAL_OUTPUTS, rows)
                    store.write_records(EVAL_RESULTS, [result])
                    report.done.append(result["cell"])
                advance(1, info=f"{cell.system.name} / {cell.preset} / {cell.split}")
    report.seconds = time.perf_counter() - started
    return report


def evaluate(config: MergConfig) -> SweepReport:
    """Evaluate the systems of `config.evaluate` in this process, without Ray (`merg evaluate`)."""
    ec = config.evaluate
    store = Store.open(config.paths.store)
    report = SweepReport(ec.sweep, 0)
    started = time.perf_counter()
    for cell in grid(config):
        report.cells += 1
        if not ec.force and store.read_records(EVAL_RESULTS, build_filter(cell=cell.id(ec), status="done"), ["cell"]).num_rows:
            report.skipped += 1
            continue
        try:
            rows, result = _run_cell(cell, config, os.cpu_count() or 1)
        except Exception as exc:
            store.write_records(EVAL_RESULTS, [_failure(cell, config, repr(exc))])
            report.failed[cell.id(ec)] = repr(exc)
            raise
        store.write_records(EVAL_OUTPUTS, rows)
        store.write_records(EVAL_RESULTS, [result])
        report.done.append(result["cell"])
    report.seconds = time.perf_counter() - started
    return report
