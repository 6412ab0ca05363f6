"""`sweep(config)`: every cell of a grid (systems x decoding presets x splits) as a Ray task.

    report = sweep(load_config("configs/sweeps/demo.yaml"))

Cells run in parallel on the Ray cluster (`evaluate.ray_address`, or a local Ray), each with
`evaluate.cpus_per_cell` CPUs and `evaluate.gpus_per_cell` GPUs, generation and metrics batched inside.
The driver writes each finished cell's per-example outputs and aggregates into the store's
`eval_outputs` / `eval_results` tables as it arrives. A cell already stored as done (same id: system and
its weights, preset, split, targets' content, resolved metric backends and every setting that changes its
numbers; not the sweep's name) is reused, by this or any other sweep, and listed in `sweep_cells` as a
member of this sweep; a cell that fails is stored as `failed` with its error and the sweep goes on; a
re-run retries only what is not done.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field

from evaluation.evaluate import Cell, evaluate_cell, resolve_inputs
from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS, SWEEP_CELLS
from featurestore.store import Store, build_filter
from infra.config import MergConfig
from infra.progress import progress_bar

log = logging.getLogger(__name__)

CELL_RETRIES = 1  # Ray re-runs a cell whose worker or node died (not one that raised)


@dataclass
class SweepReport:
    sweep: str
    cells: int
    skipped: int = 0
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> error
    cell_ids: list[str] = field(default_factory=list)  # every cell of the grid, done now or before
    seconds: float = 0.0


def grid(config: MergConfig) -> list[Cell]:
    ec = config.evaluate
    if not ec.systems:
        raise ValueError("the sweep has no systems: list them under evaluate.systems (see configs/sweeps/)")
    return [Cell(ec.sweep, system, preset, split) for system in ec.systems for preset in ec.presets for split in ec.splits]


def _run_cell(cell: Cell, cell_id: str, config: MergConfig, threads: int) -> tuple[list[dict], dict]:
    import torch

    torch.set_num_threads(max(1, threads))
    config.storage.apply()  # a store in object storage: the driver's endpoint and credentials
    return evaluate_cell(cell, config, cell_id=cell_id)


def _plan(config: MergConfig, store: Store) -> tuple[list[tuple[str, Cell]], SweepReport]:
    """The cells still to run, each with its id (computed once: a run's id hashes its weights)."""
    ec = config.evaluate
    inputs = resolve_inputs(config, store)
    cells = [(cell.id(ec, inputs), cell) for cell in grid(config)]
    store.write_records(SWEEP_CELLS, [dict(id=f"{cell.sweep}:{cell_id}", sweep=cell.sweep, cell=cell_id, system=cell.system.name,
                                          preset=cell.preset, split=cell.split) for cell_id, cell in cells])  # fmt: skip
    done: set[str] = set()
    if not ec.force:
        done = set(store.read_records(EVAL_RESULTS, build_filter(status="done"), ["cell"]).column("cell").to_pylist())
    todo = [(cell_id, cell) for cell_id, cell in cells if cell_id not in done]
    return todo, SweepReport(ec.sweep, len(cells), skipped=len(cells) - len(todo), cell_ids=[i for i, _ in cells])


def _record(store: Store, report: SweepReport, config: MergConfig, cell_id: str, cell: Cell,
            outcome: tuple[list[dict], dict] | str) -> None:  # fmt: skip
    """Store a finished cell's outputs and result, or a failed cell's error (`outcome` is then a str)."""
    if isinstance(outcome, str):
        failure = dict(
            cell=cell_id, sweep=cell.sweep, system=cell.system.name, model=cell.system.model,
            modality=cell.system.modality, run=str(cell.system.run) if cell.system.run else None, preset=cell.preset,
            split=cell.split, target=config.evaluate.target, status="failed", error=outcome[-4000:], examples=0,
            config_hash=config.fingerprint(),
        )  # fmt: skip
        store.write_records(EVAL_RESULTS, [failure])
        report.failed[cell_id] = outcome
        return
    rows, result = outcome
    store.write_records(EVAL_OUTPUTS, rows)
    store.write_records(EVAL_RESULTS, [result])
    report.done.append(cell_id)


def sweep(config: MergConfig) -> SweepReport:
    import ray

    from infra.runtime import init_ray

    ec = config.evaluate
    started = time.perf_counter()
    store = Store.open(config.paths.store)
    todo, report = _plan(config, store)
    log.info("sweep %s: %d cells, %d already done", ec.sweep, report.cells, report.skipped)
    if todo:
        init_ray(ec.ray_address, ec.num_cpus)
        config = config.model_copy(update={"storage": config.storage.resolved()})  # for cells on other nodes
        remote = ray.remote(num_cpus=ec.cpus_per_cell, num_gpus=ec.gpus_per_cell, max_retries=CELL_RETRIES)(_run_cell)
        pending = {remote.remote(cell, cell_id, config, int(ec.cpus_per_cell)): (cell_id, cell) for cell_id, cell in todo}
        with progress_bar(f"sweep {ec.sweep}", len(todo)) as advance:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell_id, cell = pending.pop(ready[0])
                try:
                    outcome = ray.get(ready[0])
                except Exception as exc:  # a failing cell is recorded; the sweep goes on
                    cause = getattr(exc, "cause", None) or exc
                    outcome = "".join(traceback.format_exception_only(type(cause), cause)).strip()
                    log.error("cell %s (%s / %s / %s) failed: %s", cell_id, cell.system.name, cell.preset, cell.split, outcome)
                _record(store, report, config, cell_id, cell, outcome)
                advance(1, info=f"{cell.system.name} / {cell.preset} / {cell.split}")
    report.seconds = time.perf_counter() - started
    return report


def evaluate(config: MergConfig) -> SweepReport:
    """Evaluate the systems of `config.evaluate` in this process, without Ray (`merg evaluate`)."""
    started = time.perf_counter()
    store = Store.open(config.paths.store)
    todo, report = _plan(config, store)
    for cell_id, cell in todo:
        try:
            outcome = _run_cell(cell, cell_id, config, os.cpu_count() or 1)
        except Exception as exc:
            _record(store, report, config, cell_id, cell, repr(exc))
            raise
        _record(store, report, config, cell_id, cell, outcome)
    report.seconds = time.perf_counter() - started
    return report
