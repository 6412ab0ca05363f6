"""A cluster of separate `ray start` nodes on this machine (a head with no CPUs, two workers with one
each, infra/ray_nodes.py) that share no data path: MELD and the store are on the S3 server. The
job and the sweep run as `merg ... --ray-address` would, in a driver process of their own; midway one
worker node is killed (SIGKILL of its raylet and every worker) and the work still ends complete, each
key and each cell stored once. Every process the cluster started is gone after the tests."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from featurestore import Store, storage
from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS
from infra.ray_nodes import RayNodes, session_pids
from pipelines.synth import read_ground_truth
from pipelines.synth.faults import EXPECTED
from tests.conftest import dialogue_rows

REPO = Path(__file__).resolve().parents[2]
GOOD = (None, "text_repaired")  # EXPECTED outcomes of a clip that must be embedded


@pytest.fixture(scope="module")
def nodes():
    """A head (no CPUs: it schedules, runs no decode or cell) and workers w1, w2 of one CPU each. Ends
    every process of every node it started, and checks that none is left."""
    root = Path(tempfile.mkdtemp(prefix="merg-ray-"))  # short: Ray's socket paths must fit in 107 characters
    cluster = RayNodes(root, object_store_mb=200, env={"PYTHONPATH": str(REPO)})
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_worker("w1")
        cluster.add_worker("w2")
        cluster.wait_until_alive(3)
        yield cluster
    finally:
        cluster.stop(timeout=5)  # then SIGKILL: nothing of theirs needs keeping
        left = [pid for node in cluster.nodes for pid in session_pids(node.sid)]
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the Ray nodes still running: {left}"


def _two_workers(cluster: RayNodes) -> list:
    """Two live worker nodes: a node killed by an earlier test is replaced by a new one."""
    alive = [n for n in cluster.nodes if n.name != "head" and not n.killed]
    for i in range(2 - len(alive)):
        alive.append(cluster.add_worker(f"w{len(cluster.nodes) + i}"))
    cluster.wait_until_alive(3)
    return alive


@pytest.fixture()
def on_s3(s3_server):
    """This process reads and writes the S3 server (as the drivers do, through their AWS variables)."""
    storage.configure(s3_server.settings())
    yield
    storage.configure(None)


@pytest.fixture()
def driver(nodes, s3_server):
    """Start a driver process (`merg ...` against the cluster, with the cluster's token and the S3
    server's AWS variables); stops what is still running of it afterwards."""
    started: list[subprocess.Popen] = []

    def start(*args: str, log: Path) -> subprocess.Popen:
        env = {**nodes.env, **s3_server.env()}
        with log.open("w") as out:
            process = subprocess.Popen([sys.executable, "-m", "infra.cli", *args], cwd=REPO, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        for pid in session_pids(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=30)


def _kill_when_busy(cluster: RayNodes, candidates: list, ready, job: subprocess.Popen, task: str = "", prefer: str = "",
                    timeout: float = 300) -> tuple:  # fmt: skip
    """Wait until `ready()` and a candidate node runs a task (whose name has `task`), then SIGKILL that
    node (one running `prefer`, if any does); returns the node and what it was running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        titles = {node: cluster.running(node) for node in candidates}
        busy = {node: running for node, running in titles.items() if any(task in t for t in running)}
        if busy and ready():
            node = next((n for n, running in busy.items() if any(prefer and prefer in t for t in running)), next(iter(busy)))
            cluster.kill(node)
            return node, busy[node]
        time.sleep(0.2)
    raise AssertionError("the driver ended, or no node got work, before a node could be killed")


@pytest.mark.slow
def test_preprocess_across_nodes_survives_losing_one(nodes, driver, on_s3, mini_meld, tmp_path):
    """`merg preprocess --ray-address` with MELD and the store on S3; once writers have written fragments,
    a worker node dies: the one holding the encoder's actor if a worker does, else one running a task.
    Every good clip is embedded and stored once, every fault is recorded, the store is compacted after."""
    root = "s3://merg/cluster-preprocess"
    storage.upload_tree(mini_meld, f"{root}/MELD.Raw")
    worker1, worker2 = _two_workers(nodes)
    data = f"{root}/store/utterances.lance/data"
    # dev and test: 9 clips (empty, truncated, no audio, two with damaged text, four good); one clip a fragment
    job = driver("preprocess", "--meld-root", f"{root}/MELD.Raw", "--store", f"{root}/store", "--ray-address", nodes.address,
                 "--batch-size", "2", "--set", "preprocess.splits=[dev,test]", "--set", "preprocess.write_batch=1",
                 "--set", "preprocess.commit_interval_s=2", "--set", "preprocess.asd_method=none", log=tmp_path / "driver.log")  # fmt: skip
    # the node that holds the encoder's actor, if a worker does (its pool must replace it), else one
    # that runs tasks (they must run again)
    victim, running = _kill_when_busy(nodes, [worker1, worker2], lambda: len(storage.list_dir(data)) >= 2, job, prefer="ImageBindStage")
    print(f"killed node {victim.name}, which ran {running}")
    try:
        job.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job hung after node {victim.name} died (it ran {running}); log:\n{(tmp_path / 'driver.log').read_text()[-3000:]}")
    log = (tmp_path / "driver.log").read_text()
    assert job.returncode == 0, log[-3000:]
    assert nodes.alive_nodes() == 2  # the head and the other worker

    truth = {k: t for k, t in read_ground_truth(mini_meld).items() if t["split"] in ("dev", "test")}
    store = Store.open(f"{root}/store")
    keys = store.query(columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == set(truth)
    embedded = set(store.query(where="fused_emb IS NOT NULL", columns=["key"]).column("key").to_pylist())
    failures = {(f["key"], f["reason"]) for f in store.failures().to_pylist()}
    for key, t in truth.items():
        expected = EXPECTED.get(t["fault"]) if t["fault"] else None
        if expected in GOOD:
            assert key in embedded and not any(k == key for k, _ in failures), key
        elif t["fault"] == "no_audio":
            assert key in embedded and (key, "no_audio_stream") in failures
        else:
            assert key not in embedded and (key, "missing_file" if expected == "missing" else expected) in failures, key
    assert store.lance_dataset().stats.dataset_stats()["num_fragments"] == 1  # upkeep after the job


@pytest.mark.slow
def test_a_sweep_cell_whose_node_dies_runs_again_elsewhere_and_is_stored_once(nodes, driver, on_s3, tiny_llm, tmp_path):
    """Three cells on two one-CPU workers: once cells run on both, w2's node is killed. Its cell is
    run again on a live node; every cell ends done, with one result row and one output per example."""
    from infra.config import TargetsConfig
    from training import build_targets

    root = "s3://merg/cluster-sweep/store"
    store = Store.open(root, create=True, embedding_dim=32)
    store.write_utterances(dialogue_rows(16, 4))
    build_targets(store, TargetsConfig(kind="next_utterance"), tmp_path)
    worker1, worker2 = _two_workers(nodes)
    ids = nodes.node_ids()
    systems = [{"name": f"tiny {i}", "model": str(tiny_llm), "modality": "text", "quantization": "none"} for i in range(3)]
    settings = [f"evaluate.systems={json.dumps(systems)}", "evaluate.limit=3", "evaluate.emotion_backend=lexicon", "evaluate.sweep=cluster",
                "evaluate.bootstrap_samples=20", "evaluate.cpus_per_cell=1", "evaluate.splits=[train]"]  # fmt: skip
    job = driver("sweep", "--store", root, "--ray-address", nodes.address, *(a for s in settings for a in ("--set", s)),
                 log=tmp_path / "driver.log")  # fmt: skip
    both_busy = lambda: any("_run_cell" in t for t in nodes.running(worker1))  # noqa: E731
    _kill_when_busy(nodes, [worker2], both_busy, job, task="_run_cell")
    job.wait(timeout=600)
    log = (tmp_path / "driver.log").read_text()
    assert job.returncode == 0, log[-3000:]

    results = Store.open(root).read_records(EVAL_RESULTS).to_pylist()
    assert len(results) == 3 and {r["status"] for r in results} == {"done"}, results
    assert len({r["cell"] for r in results}) == 3
    dead = f"/{ids[worker2.name][:12]}"
    assert not any(r["node"].endswith(dead) for r in results)  # the killed cell's result came from a live node
    outputs = Store.open(root).read_records(EVAL_OUTPUTS).to_pylist()
    per_cell = {cell: sum(o["cell"] == cell for o in outputs) for cell in {r["cell"] for r in results}}
    assert set(per_cell.values()) == {3}, per_cell


def test_cluster_launcher_config_has_cpu_head_and_gpu_workers():
    import yaml

    config = yaml.safe_load((REPO / "infra" / "ray" / "cluster.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert "g5" in types["gpu_worker"]["node_config"]["InstanceType"] and types["gpu_worker"]["max_workers"] >= 1
    assert any("make install" in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
