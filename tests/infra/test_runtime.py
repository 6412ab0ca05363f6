import sys

import pytest

from infra.runtime import launch_command


def test_torchrun_command_drops_launcher_flags():
    argv = ["-v", "train", "--config", "c.yaml", "--launcher", "torchrun", "--nproc=4", "--max-steps", "3"]
    command = launch_command("torchrun", 4, argv)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4"]
    assert command[-7:] == ["infra.cli", "-v", "train", "--config", "c.yaml", "--max-steps", "3"]


def test_deepspeed_command_takes_a_hostfile():
    command = launch_command("deepspeed", 8, ["train", "--launcher", "deepspeed", "--hostfile", "hosts"], hostfile="hosts")
    assert command[0].endswith("deepspeed") and command[1:5] == ["--hostfile", "hosts", "--num_gpus", "8"]
    assert command[-4:] == ["--no_local_rank", "--module", "infra.cli", "train"]


def test_hostfile_needs_deepspeed():
    with pytest.raises(ValueError, match="deepspeed"):
        launch_command("torchrun", 2, ["train"], hostfile="hosts")


# ---- issue 27 item 7: the local Ray merg starts does not outlive its driver --------------------------
def _alive(recorded) -> list:
    """The processes of `recorded` ((pid, start time) pairs) still running: by the PIDs recorded, never by name."""
    import psutil

    from infra.ray_watchdog import _process

    return [psutil.Process(who[0]) for who in recorded if _process(who) is not None]


def _stop(recorded) -> None:
    for process in _alive(recorded):
        process.kill()


def test_the_watchdog_reaps_only_its_roots_trees_once_the_driver_is_gone(tmp_path):
    """A stand-in driver, a root with a child (as the raylet and its agents) and a bystander (a Ray
    process merg did not start): killing the driver ends the root's tree; the bystander lives, as does
    a process whose pid the watchdog knew under another start time (a reused pid)."""
    import subprocess
    import time

    import psutil

    from infra.ray_watchdog import identity, reap

    driver = subprocess.Popen(["sleep", "120"])
    root = subprocess.Popen(["sh", "-c", "sleep 120 & wait"])
    bystander = subprocess.Popen(["sleep", "120"])
    time.sleep(0.3)  # the root's child is up
    tree = [identity(psutil.Process(root.pid)), *map(identity, psutil.Process(root.pid).children())]
    watchdog = subprocess.Popen(
        [sys.executable, "infra/ray_watchdog.py", *(f"{pid}:{started!r}" for pid, started in [identity(psutil.Process(driver.pid)), tree[0]])],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert len(tree) == 2
        assert reap({(bystander.pid, psutil.Process(bystander.pid).create_time() + 1)}) == []  # a reused pid: left alone
        time.sleep(1.5)  # the watchdog has noted the tree
        assert len(_alive(tree)) == 2 and watchdog.poll() is None  # nothing touched while the driver lives
        driver.kill()
        driver.wait()
        watchdog.wait(timeout=20)
        assert not _alive(tree) and bystander.poll() is None
    finally:
        for process in (driver, root, bystander, watchdog):
            process.kill()
            process.wait()
        _stop(tree)


DRIVER = """
import os, time
import ray
from infra.runtime import init_ray
init_ray(num_cpus=1)
ray.get([ray.remote(lambda: os.getpid()).remote() for _ in range(2)])
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_local_ray_merg_starts_does_not_outlive_a_killed_driver():
    """issue 27 item 7: after a SIGKILL of a driver that started Ray the merg way, every process it had
    started (GCS, raylet, agents, workers, the watchdog) is gone within 20 s; Ray's agents outlived it
    by about a minute before."""
    import os
    import subprocess
    import time

    import psutil

    from infra.ray_watchdog import identity

    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    started = []
    try:
        assert driver.stdout.readline().strip() == "ready"
        time.sleep(1)  # the watchdog polls twice a second
        started = [identity(p) for p in psutil.Process(driver.pid).children(recursive=True)]
        assert len(started) >= 6, started  # GCS, raylet, agents, workers, the watchdog, ...
        driver.kill()
        driver.wait()
        deadline = time.time() + 20
        while _alive(started) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(started), [(p.pid, p.name()) for p in _alive(started)]
    finally:
        driver.kill()
        driver.wait()
        _stop(started)
