"""Process-wide runtime setup: offline model hubs, logging. Called once by the CLI and by jobs."""

from __future__ import annotations

import logging
import os

from rich.logging import RichHandler

# Nothing may reach a model hub at run time: a missing model must fail with a clear message
# naming the local path, not hang on a network call.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def configure_logging(verbose: bool = False) -> None:
    from infra.progress import console

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, markup=False)],
        force=True,
    )
    for noisy in ("filelock", "urllib3", "numba", "matplotlib", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # transformers' per-load "Loading weights" bars and advice drown merg's own output
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster (`address`, e.g. "auto") or start a local one; once per process."""
    import ray

    if ray.is_initialized():
        return
    configure_offline()
    kwargs: dict = dict(address=address, include_dashboard=False, logging_level=logging.WARNING)
    if address is None:
        kwargs["num_cpus"] = num_cpus
    # Workers inherit the offline settings; the project root goes with them so that stages import.
    ray.init(**kwargs, runtime_env={"env_vars": {**OFFLINE_ENV}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the job shows its own bar
