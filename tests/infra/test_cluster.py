import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_preprocess_and_sweep_on_a_two_node_cluster(mini_meld, tiny_llm, tmp_path):
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("cluster_job.py")), str(mini_meld), str(tmp_path), str(tiny_llm)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2 and result["rows"] > 0
    assert result["done"] == 2 and not result["failed"]
    # each node has one CPU and each cell takes one: the two cells ran on the two nodes
    assert len(result["cell_nodes"]) == 2


def test_cluster_launcher_config_has_cpu_head_and_gpu_workers():
    import yaml

    config = yaml.safe_load((REPO / "infra" / "ray" / "cluster.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert "g5" in types["gpu_worker"]["node_config"]["InstanceType"] and types["gpu_worker"]["max_workers"] >= 1
    assert any("make install" in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
