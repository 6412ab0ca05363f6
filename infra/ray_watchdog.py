"""The local Ray that a merg process starts does not outlive that process.

Ray ties the processes the driver spawns itself (GCS, raylet, monitor, log monitor, dashboard) to the
driver with a parent-death signal (prctl PR_SET_PDEATHSIG), but not what the raylet spawns: its dashboard
and runtime-env agents notice that the raylet died, then hang while reporting it to a GCS that is dead
too (measured: alive ~70 s after a SIGKILL of the driver). `infra.runtime.init_ray` therefore starts
this watchdog right after it starts a local Ray:

    python infra/ray_watchdog.py DRIVER_PID:START_TIME ROOT_PID:START_TIME ...

It notes, every `POLL_S`, each process descended from the roots (the processes that driver's `ray.init`
started), and once the driver is gone it terminates those still alive (SIGKILL after `GRACE_S`). It
knows processes by pid and start time, so a reused pid is never hit, and looks at nothing outside the
roots' trees: Ray processes merg did not start (another job's, a cluster merg connects to) are never
touched. It exits by itself when every noted process has ended (a `ray.shutdown()`).
"""

from __future__ import annotations

import select
import sys

import psutil

POLL_S = 0.5
GRACE_S = 2.0

Identity = tuple[int, float]  # (pid, start time): a pid alone may have been reused


def identity(process: psutil.Process) -> Identity:
    return process.pid, process.create_time()


def _process(who: Identity) -> psutil.Process | None:
    """The running process `who` is, or None once it ended (or its pid belongs to another process now)."""
    try:
        process = psutil.Process(who[0])
        if process.create_time() != who[1] or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.Error:
        return None


def note_descendants(roots: list[Identity], known: set[Identity]) -> None:
    """Add every live root and each process descended from it to `known`."""
    for root in roots:
        process = _process(root)
        if process is None:
            continue
        known.add(root)
        try:
            children = process.children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                known.add(identity(child))
            except psutil.Error:
                continue


def reap(known: set[Identity], grace: float = GRACE_S) -> list[int]:
    """Terminate the processes of `known` still running (SIGKILL those left after `grace` s); their pids."""
    alive = [p for p in map(_process, known) if p is not None]
    for process in alive:
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            continue
    return [p.pid for p in alive]


def watch(driver: Identity, roots: list[Identity], poll: float = POLL_S, grace: float = GRACE_S) -> list[int]:
    """Note the roots' trees until the driver is gone, then reap what is left of them; the pids reaped
    ([] when everything ended with the driver still there). The driver holds the write end of this
    process's stdin: its end (EOF) wakes the watchdog at once, polling catches the rest."""
    known: set[Identity] = set()
    stdin_open = True
    while True:
        note_descendants(roots, known)
        if _process(driver) is None:
            break
        if all(_process(who) is None for who in known | set(roots)):
            return []  # Ray was shut down: nothing left to guard
        if stdin_open:
            readable, _, _ = select.select([sys.stdin], [], [], poll)
            if readable and not sys.stdin.buffer.read1(4096):
                stdin_open = False  # the driver is gone, or it closed the pipe (e.g. forked children hold it)
        else:
            psutil.wait_procs([p for p in [_process(driver)] if p is not None], timeout=poll)
    return reap(known, grace)


def _identity_arg(text: str) -> Identity:
    pid, started = text.split(":")
    return int(pid), float(started)


if __name__ == "__main__":
    driver_arg, *root_args = sys.argv[1:]
    watch(_identity_arg(driver_arg), [_identity_arg(a) for a in root_args])
