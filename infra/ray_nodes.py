"""A Ray cluster of separate `ray start` nodes on this machine, for tests and benchmarks that need real
nodes: each node is its own `ray start --block` process in its own session, with its own temp dir and
`--resources`, so that one can be killed (SIGKILL of its raylet and every worker it started) while a job
runs on the others.

Every node binds 127.0.0.2: Ray replaces 127.0.0.1 and "localhost" by the machine's outward address,
and any other loopback address is kept, so all traffic stays on loopback. The cluster uses Ray's token
authentication with a token of its own (passed in the environment, never written to ~/.ray). Stopping
ends exactly the sessions it started, found by session id in /proc, never by name.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.2"
RAY = str(Path(sys.executable).with_name("ray"))


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Every live process whose session id is `sid` (the node's `ray start` and all it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass(eq=False)  # one node is one object: hashable by identity
class Node:
    name: str
    process: subprocess.Popen
    log: Path
    killed: bool = False

    @property
    def sid(self) -> int:
        return self.process.pid  # started with start_new_session: its pid is the session id


class RayNodes:
    """Start a head and workers with `ray start`; `kill(node)` ends one as a machine loss would."""

    def __init__(self, root: Path, object_store_mb: int = 200, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.object_store = str(object_store_mb * 2**20)
        self.port = free_port()
        # the nodes' and any driver's environment: the cluster's token, plus `env` (e.g. PYTHONPATH). Ray's
        # memory monitor is off: it kills workers when the *machine* is nearly full, which on a shared
        # machine means when other people's jobs are big, and every node here would count them.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_monitor_refresh_ms": "0", **(env or {})}  # fmt: skip
        self.nodes: list[Node] = []

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict[str, float]) -> Node:
        temp = self.root / name  # short: Ray's socket paths must fit in 107 characters
        temp.mkdir(exist_ok=True)
        log = self.root / f"{name}.log"
        command = [RAY, "start", "--block", f"--node-ip-address={HOST}", f"--num-cpus={num_cpus}",
                   f"--resources={json.dumps(resources)}", f"--object-store-memory={self.object_store}",
                   f"--temp-dir={temp}", "--disable-usage-stats", *args]  # fmt: skip
        with log.open("w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        node = Node(name, process, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int = 0, resources: dict[str, float] | None = None) -> Node:
        args = ["--head", f"--port={self.port}", "--include-dashboard=false", f"--dashboard-port={free_port()}"]
        return self._start("head", args, num_cpus, resources or {"head": 1})

    def add_worker(self, name: str, num_cpus: int = 1, resources: dict[str, float] | None = None) -> Node:
        return self._start(name, [f"--address={self.address}"], num_cpus, resources or {name: 1})

    def _ask(self, expression: str):
        """`expression` evaluated (as JSON) by a driver in a separate process, connected to the head."""
        code = f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); print(json.dumps({expression}))"
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else None

    def alive_nodes(self) -> int:
        """Nodes the cluster counts alive, asked of the head from a separate process."""
        return self._ask("sum(n['Alive'] for n in ray.nodes())") or 0

    def node_ids(self) -> dict[str, str]:
        """Each node's Ray node id, by name (found by the node's own resource), alive or dead."""
        nodes = self._ask("[(n['NodeID'], sorted(n['Resources'])) for n in ray.nodes()]") or []
        return {node.name: node_id for node in self.nodes for node_id, resources in nodes if node.name in resources}

    def running(self, node: Node) -> list[str]:
        """What the node's Ray workers are doing now: their process titles (`ray::<task or actor>`), idle
        workers and the node's own agents left out."""
        titles = []
        for pid in session_pids(node.sid):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and title != "ray::IDLE" and not title.endswith("Agent"):
                titles.append(title)
        return titles

    def wait_until_alive(self, count: int, timeout: float = 120) -> None:
        """Until every node's `ray start` says it started (killed ones aside), then until the head counts
        `count` nodes alive."""
        deadline = time.monotonic() + timeout
        live = [node for node in self.nodes if not node.killed]
        while not all("Ray runtime started" in node.log.read_text() for node in live):
            for node in live:
                if node.process.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited: {node.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray nodes not started after {timeout:.0f} s (logs in {self.root})")
            time.sleep(0.5)
        while self.alive_nodes() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} ray nodes not alive after {timeout:.0f} s (logs in {self.root})")
            time.sleep(1)

    def kill(self, node: Node) -> list[int]:
        """SIGKILL every process of the node's session (its raylet, agents and workers); returns their pids."""
        pids = session_pids(node.sid)
        node.killed = True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.process.wait(timeout=30)
        return pids

    def stop(self, timeout: float = 20) -> None:
        """End every node this object started: SIGTERM to its session, SIGKILL what remains after
        `timeout` seconds; returns once none of their processes is left (or 10 s more have passed)."""
        for node in reversed(self.nodes):  # workers before the head
            for pid in session_pids(node.sid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(session_pids(n.sid) for n in self.nodes):
            time.sleep(0.5)
        for node in self.nodes:
            for pid in session_pids(node.sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10  # a killed process takes a moment to be gone
        while time.monotonic() < deadline and any(session_pids(n.sid) for n in self.nodes):
            time.sleep(0.2)
