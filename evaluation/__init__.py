"""evaluation: reply generation and metrics over sweeps of systems, results in the store, reports.

Doors: `evaluation.metrics` (each metric a small function), `evaluate(config)` (the systems of
`config.evaluate`, in this process), `sweep(config)` (the grid as Ray tasks, resumable),
`report(store, sweep, out_dir)` (report.md / report.html with tables and plots).
"""

from evaluation.report import report
from evaluation.sweep import evaluate, sweep

__all__ = ["evaluate", "report", "sweep"]
