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
    for noisy in ("filelock", "urllib3", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
