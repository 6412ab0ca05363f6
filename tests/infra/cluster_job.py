"""Run by test_cluster.py in its own process: a two-node Ray cluster on this machine (one CPU per
node), then `run_preprocess` and a sweep against it, as `merg ... --ray-address ADDRESS` would.
Prints one JSON line: nodes alive, rows written, and the nodes the sweep's cells ran on."""

import json
import sys
from pathlib import Path

from ray.cluster_utils import Cluster

from featurestore.schema import EVAL_RESULTS
from featurestore.store import Store
from infra.config import load_config
from infra.runtime import configure_offline


def main(mini_meld: str, work: str, tiny_llm: str) -> None:
    configure_offline()
    work = Path(work)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        common = [f"paths.store={work / 'store'}"]
        from pipelines.job import run_preprocess

        run_preprocess(load_config(None, common + [f"preprocess.meld_root={mini_meld}", f"preprocess.ray_address={cluster.address}",
                                                  "preprocess.asd_method=none"]))  # fmt: skip
        store = Store.open(work / "store")
        from training import build_targets

        build_targets(store, load_config().targets, work)
        import ray

        nodes = sum(n["Alive"] for n in ray.nodes())
        systems = [{"name": f"tiny {i}", "model": tiny_llm, "modality": "text", "quantization": "none"} for i in range(2)]
        from evaluation import sweep

        report = sweep(load_config(None, common + [
            f"evaluate.ray_address={cluster.address}", f"evaluate.systems={json.dumps(systems)}", "evaluate.limit=3",
            "evaluate.emotion_backend=lexicon", "evaluate.bootstrap_samples=20", "evaluate.cpus_per_cell=1", "evaluate.splits=[train]",
        ]))  # fmt: skip
        results = store.read_records(EVAL_RESULTS).to_pylist()
        print(json.dumps({"nodes": nodes, "rows": store.stats().rows, "done": len(report.done),
                          "failed": report.failed, "cell_nodes": sorted({r["node"] for r in results})}))  # fmt: skip
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
