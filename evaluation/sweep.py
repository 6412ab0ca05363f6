"""`sweep(config)`: every cell of a grid (systems x decoding presets x splits) as a Ray task.

    report = sweep(load_config("configs/sweeps/demo.yaml"))

Cells run in parallel on the Ray cluster (`evaluate.ray_address`, or a local Ray), each with
`evaluate.cpus_per_cell` CPUs and `evaluate.gpus_per_cell` GPUs, generation and metrics batched inside.
A cell streams its per-example outputs into the store's `eval_outputs` in chunks (`evaluation.evaluate`),
so a cell whose worker dies is retried by Ray once and goes on from its first missing batch, and so does
a re-run after the whole sweep was killed; the driver writes each finished cell's aggregates into
`eval_results` as it arrives. A cell already stored as done (same id: system and its weights, preset
parameters, split, targets' content, resolved metric backends and every setting that changes its
numbers; not the sweep's name) is reused, by this or any other sweep, and listed in `sweep_cells` as a
member of this sweep; a cell that fails is stored as `failed` with its error and the sweep goes on; a
re-run retries only what is not done. Ctrl-C or SIGTERM stops every cell after it stored its finished
batches. `sweep_status(store, name)` reads how far each cell is from the store (`merg sweep --status`),
the same lines the running sweep shows.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone

from evaluation.evaluate import Cell, CellInterrupted, evaluate_cell, resolve_inputs, stop_on_sigterm
from featurestore.schema import CELL_PROGRESS, EVAL_RESULTS, SWEEP_CELLS
from featurestore.store import Store, build_filter
from infra.config import MergConfig
from infra.progress import console

log = logging.getLogger(__name__)

CELL_RETRIES = 1  # Ray re-runs a cell whose worker or node died (not one that raised); it resumes from its stored chunks
POLL_SECONDS = 5.0


@dataclass
class SweepReport:
    sweep: str
    cells: int
    skipped: int = 0
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> error
    cell_ids: list[str] = field(default_factory=list)  # every cell of the grid, done now or before
    resumed: dict[str, dict] = field(default_factory=dict)  # cell id -> examples reused, chunks redone (resumed cells)
    seconds: float = 0.0


def grid(config: MergConfig) -> list[Cell]:
    ec = config.evaluate
    if not ec.systems:
        raise ValueError("the sweep has no systems: list them under evaluate.systems (see configs/sweeps/)")
    return [Cell(ec.sweep, system, preset, split) for system in ec.systems for preset in ec.presets for split in ec.splits]


def _run_cell(cell: Cell, cell_id: str, config: MergConfig, threads: int) -> dict:
    import torch

    torch.set_num_threads(max(1, threads))
    config.storage.apply()  # a store in object storage: the driver's endpoint and credentials
    return evaluate_cell(cell, config, cell_id=cell_id)


def _plan(config: MergConfig, store: Store) -> tuple[list[tuple[str, Cell]], SweepReport]:
    """The cells still to run, each with its id (computed once: a run's id hashes its weights)."""
    ec = config.evaluate
    inputs = resolve_inputs(config, store)
    cells = [(cell.id(ec, inputs), cell) for cell in grid(config)]
    planned = datetime.now(timezone.utc)  # to the microsecond: a cell done before it was reused by this run
    store.write_records(SWEEP_CELLS, [dict(id=f"{cell.sweep}:{cell_id}", sweep=cell.sweep, cell=cell_id, system=cell.system.name,
                                          preset=cell.preset, split=cell.split, created_at=planned) for cell_id, cell in cells])  # fmt: skip
    done: set[str] = set()
    if not ec.force:
        done = set(store.read_records(EVAL_RESULTS, build_filter(status="done"), ["cell"]).column("cell").to_pylist())
    todo = [(cell_id, cell) for cell_id, cell in cells if cell_id not in done]
    return todo, SweepReport(ec.sweep, len(cells), skipped=len(cells) - len(todo), cell_ids=[i for i, _ in cells])


def _record(store: Store, report: SweepReport, config: MergConfig, cell_id: str, cell: Cell, outcome: dict | str) -> None:
    """Store a finished cell's result, or a failed cell's error (`outcome` is then a str)."""
    if isinstance(outcome, str):
        failure = dict(
            cell=cell_id, sweep=cell.sweep, system=cell.system.name, model=cell.system.model,
            modality=cell.system.modality, run=str(cell.system.run) if cell.system.run else None, preset=cell.preset,
            split=cell.split, target=config.evaluate.target, status="failed", error=outcome[-4000:], examples=0,
            config_hash=config.fingerprint(), created_at=datetime.now(timezone.utc),
        )  # fmt: skip
        store.write_records(EVAL_RESULTS, [failure])
        report.failed[cell_id] = outcome
        return
    store.write_records(EVAL_RESULTS, [dict(outcome, created_at=datetime.now(timezone.utc))])
    report.done.append(cell_id)
    progress = store.read_records(CELL_PROGRESS, build_filter(cell=cell_id)).to_pylist()
    if progress and (progress[0]["reused"] or progress[0]["redone"]):
        report.resumed[cell_id] = {"reused": progress[0]["reused"], "redone": progress[0]["redone"], "attempt": progress[0]["attempt"]}


def _error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return "".join(traceback.format_exception_only(type(cause), cause)).strip()


def sweep(config: MergConfig) -> SweepReport:
    import ray

    from infra.runtime import init_ray

    ec = config.evaluate
    started = time.perf_counter()
    store = Store.open(config.paths.store)
    todo, report = _plan(config, store)
    log.info("sweep %s: %d cells, %d already done", ec.sweep, report.cells, report.skipped)
    if not todo:
        report.seconds = time.perf_counter() - started
        return report
    init_ray(ec.ray_address, ec.num_cpus)
    config = config.model_copy(update={"storage": config.storage.resolved()})  # for cells on other nodes
    remote = ray.remote(num_cpus=ec.cpus_per_cell, num_gpus=ec.gpus_per_cell, max_retries=CELL_RETRIES)(_run_cell)
    pending = {remote.remote(cell, cell_id, config, int(ec.cpus_per_cell)): (cell_id, cell) for cell_id, cell in todo}
    display = StatusDisplay(store, ec.sweep)
    try:
        with stop_on_sigterm(), display:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    cell_id, cell = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # a failing cell is recorded; the sweep goes on
                        outcome = _error(exc)
                        log.error("cell %s (%s / %s / %s) failed: %s", cell_id, cell.system.name, cell.preset, cell.split, outcome)
                    _record(store, report, config, cell_id, cell, outcome)
                display.refresh()
    except (KeyboardInterrupt, CellInterrupted):
        log.warning("sweep %s stopped: each running cell stores its finished batches; a re-run resumes them", ec.sweep)
        for ref in pending:
            ray.cancel(ref)  # KeyboardInterrupt inside the cell, which stores what it finished
        ray.wait(list(pending), num_returns=len(pending), timeout=120)
        raise
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


# ---- progress: read from the store, so any process can show it ----------------------------------------
STALE_SECONDS = 1800.0  # a running cell with no pace yet and no update for this long is taken as stopped


@dataclass
class CellState:
    system: str
    preset: str
    split: str
    cell: str
    state: str  # done | reused | failed | running | stopped | waiting
    done: int = 0  # examples stored
    total: int | None = None
    seconds_per_example: float | None = None
    eta_seconds: float | None = None
    reused: int = 0  # examples an earlier attempt had stored
    redone: int = 0  # chunks recomputed that an earlier attempt had in flight
    attempt: int = 0
    error: str | None = None


def _alive(row: dict, now: datetime) -> bool:
    """Is the attempt that wrote this progress row still running? Its process, where it is on this
    host; else whether it wrote recently for its pace (three chunks' time, at least 10 minutes)."""
    host = (row.get("node") or "").split("/")[0]
    if host == socket.gethostname() and row.get("pid"):
        try:
            os.kill(row["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    pace, per_chunk = row.get("seconds_per_example"), (row["total"] or 0) / max(1, row.get("chunks") or 1)
    limit = max(600.0, 3 * per_chunk * pace) if pace else STALE_SECONDS
    return (now - row["created_at"]).total_seconds() < limit


def sweep_status(store: Store, sweep: str) -> list[CellState]:
    """Every cell of the sweep's latest plan (`sweep_cells`), with how far it is."""
    members = store.read_records(SWEEP_CELLS, build_filter(sweep=sweep)).to_pylist()
    if not members:
        raise ValueError(f"no sweep {sweep!r} in the store at {store.root}: `merg sweep` plans it when it starts")
    cells = [m["cell"] for m in members]
    results = {r["cell"]: r for r in store.read_records(EVAL_RESULTS, build_filter(cell=cells), ["cell", "status", "error", "created_at"]).to_pylist()}
    progress = {r["cell"]: r for r in store.read_records(CELL_PROGRESS, build_filter(cell=cells)).to_pylist()}
    now = datetime.now(timezone.utc)
    states = []
    for m in sorted(members, key=lambda m: (m["system"], m["preset"], m["split"])):
        result, row = results.get(m["cell"]), progress.get(m["cell"])
        state = CellState(m["system"], m["preset"], m["split"], m["cell"], "waiting")
        current = row if row and (result is None or row["created_at"] > result["created_at"]) and row["created_at"] >= m["created_at"] else None
        if row:
            state.done, state.total, state.attempt = row["done"] or 0, row["total"], row["attempt"] or 0
            state.reused, state.redone, state.seconds_per_example = row["reused"] or 0, row["redone"] or 0, row["seconds_per_example"]
        if result and result["status"] == "done":
            state.state = "reused" if result["created_at"] < m["created_at"] else "done"
            state.done = state.total = state.total or state.done
        elif current and current["status"] in ("running", "scored"):
            state.state = "running" if _alive(current, now) else "stopped"
            if state.state == "running" and state.seconds_per_example and state.total:
                since = (now - current["created_at"]).total_seconds()
                state.eta_seconds = max(0.0, (state.total - state.done) * state.seconds_per_example - since)
        elif result and result["status"] == "failed":
            state.state, state.error = "failed", result["error"]
        elif current:
            state.state, state.error = "stopped", current["error"]
        states.append(state)
    return states


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def status_lines(sweep: str, states: list[CellState]) -> list[str]:
    """The sweep's line (cells done, reused, failed, running, ...), then one line per cell not yet done."""
    counts = {k: sum(s.state == k for s in states) for k in ("done", "reused", "failed", "running", "stopped", "waiting")}
    lines = [f"sweep {sweep}: {len(states)} cells: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n or k in ("done", "reused", "failed", "running"))]
    for s in states:
        if s.state in ("done", "reused"):
            continue
        line = f"  {s.system} / {s.preset} / {s.split}: {s.state}"
        if s.total:
            line += f", {s.done}/{s.total} examples ({s.done / s.total:.0%})"
        if s.seconds_per_example and s.state == "running":
            line += f", {s.seconds_per_example:.2f} s/example"
        if s.eta_seconds is not None:
            line += f", ETA {_minutes(s.eta_seconds)}"
        if s.attempt > 1 or s.reused:
            line += f" (attempt {s.attempt}: {s.reused} examples reused, {s.redone} chunk{'s' * (s.redone != 1)} redone)"
        if s.error and s.state in ("failed", "stopped"):
            line += f": {s.error.splitlines()[-1][:160]}"
        lines.append(line)
    return lines


class StatusDisplay:
    """The running sweep's status lines: redrawn in place on a terminal, logged when they change elsewhere."""

    def __init__(self, store: Store, sweep: str):
        self.store, self.sweep, self.last = store, sweep, None
        self.live = None

    def __enter__(self) -> "StatusDisplay":
        if console.is_terminal:
            from rich.live import Live

            self.live = Live("", console=console, refresh_per_second=1, transient=False)
            self.live.__enter__()
        self.refresh()
        return self

    def refresh(self) -> None:
        try:
            states = sweep_status(self.store, self.sweep)
        except Exception as exc:  # progress is a view: a failed read must not stop the sweep
            log.debug("sweep status not read: %s", exc)
            return
        lines = status_lines(self.sweep, states)
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text("\n".join(lines)))
        elif (seen := [(s.cell, s.state, s.done) for s in states]) != self.last:  # a log line per stored chunk, not per poll
            log.info("\n".join(lines))
            self.last = seen

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.refresh()
            self.live.__exit__(*exc)
