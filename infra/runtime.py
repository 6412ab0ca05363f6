"""Process-wide runtime setup: offline model hubs, logging. Called once by the CLI and by jobs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

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
    """Connect to a Ray cluster (`address`, e.g. "auto") or start a local one; once per process. A
    local one is watched so that it does not outlive this process (`watch_local_ray`)."""
    import ray

    if ray.is_initialized():
        return
    configure_offline()
    # "local": a new Ray of this process's own, not whatever `ray start` cluster runs on the machine
    # (which `address=None` would join, and with `num_cpus` refuse)
    kwargs: dict = dict(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    if address is None:
        kwargs["num_cpus"] = num_cpus
    # Workers inherit the offline settings; the project root goes with them so that stages import.
    ray.init(**kwargs, runtime_env={"env_vars": {**OFFLINE_ENV}})
    if address is None:
        watch_local_ray()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the job shows its own bar


_watchdogs: list[subprocess.Popen] = []  # held: closing a watchdog's stdin would tell it this process is gone


def watch_local_ray() -> subprocess.Popen | None:
    """Start `infra/ray_watchdog.py` over the processes this process's `ray.init` started, so that none of
    them outlives it (a SIGKILL included; see there why Ray's own fate-sharing is not enough). The
    watchdog runs in its own session: a signal to this process group leaves it to clean up."""
    import psutil
    import ray

    from infra.ray_watchdog import identity

    node = getattr(ray._private.worker, "_global_node", None)  # Ray's record of what ray.init started
    started = [info.process.pid for infos in getattr(node, "all_processes", {}).values() for info in infos]
    roots = []
    for pid in started:
        try:
            roots.append(identity(psutil.Process(pid)))
        except psutil.Error:
            continue
    if not roots:  # (Ray keeps no such record where it joined a running instance: nothing of ours to watch)
        logging.getLogger(__name__).warning("no record of the Ray processes ray.init started: they are not watched")
        return None
    args = [f"{pid}:{started!r}" for pid, started in (identity(psutil.Process()), *roots)]
    watchdog = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("ray_watchdog.py")), *args], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    _watchdogs[:] = [w for w in _watchdogs if w.poll() is None] + [watchdog]  # (polling reaps finished ones)
    return watchdog


LAUNCHER_FLAGS = ("--launcher", "--nproc", "--hostfile")


def launch_command(launcher: str, nproc: int, argv: list[str], hostfile: str | None = None, master_port: int | None = None) -> list[str]:
    """The command that runs `merg <argv>` in `nproc` processes per node under torchrun or DeepSpeed.

    `argv` is this command's own arguments; the launcher flags are removed from it. torchrun runs one
    node (start it on each node yourself for several); the DeepSpeed launcher reaches every host of
    `hostfile` over ssh (pdsh).
    """
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCHER_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in LAUNCHER_FLAGS:
            continue
        rest.append(arg)
    if launcher == "torchrun":
        if hostfile:
            raise ValueError("--hostfile needs --launcher deepspeed; with torchrun start it on every node (--nnodes, --rdzv-endpoint)")
        port = ["--master_port", str(master_port)] if master_port else []
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *port, "-m", "infra.cli", *rest]
    if launcher == "deepspeed":
        hosts = ["--hostfile", hostfile] if hostfile else []
        port = ["--master_port", str(master_port)] if master_port else []
        return [str(Path(sys.executable).with_name("deepspeed")), *hosts, "--num_gpus", str(nproc), *port,
                "--no_local_rank", "--module", "infra.cli", *rest]  # fmt: skip
    raise ValueError(f"unknown launcher {launcher!r} (torchrun or deepspeed)")
