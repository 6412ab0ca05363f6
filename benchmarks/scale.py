"""How the preprocessing job's cost grows with its size.

    .venv/bin/python benchmarks/scale.py                    # 100, 400, 1,600 clips (or what fits in 20 min)
    .venv/bin/python benchmarks/scale.py --sizes 20,40,80   # a quick check
    .venv/bin/python benchmarks/scale.py --cluster [--kill-node]

One mini-MELD is generated for the largest size (`pipelines.synth`, the built-in bank, no faults; kept
in `--work` and reused), and each size preprocesses its first N train clips into a fresh store, in a
driver process of its own (`run_preprocess` with the default settings, `--set` overrides, and the
speaker stage off unless `--asd sync`: its cost per clip does not grow with the job, and with it 1,600
clips do not fit in 20 minutes on 2 cores). Per size: clips/s over the job's second half (start-up and
the pipeline's filling left out) and over its whole media part, the driver's peak RSS, the object
store's spill, and the store's fragments and versions after the job (which ends with upkeep); then the
largest size against the smallest, each figure next to its goal: clips/s (second half) >= 0.85x, driver
RSS <= 1.2x, fragments <= 4. Sizes run smallest first; one that would not fit in what is left of
`--budget-min` (estimated from the last size's seconds per clip) is cut to what fits, or dropped. From
the largest size's cost per clip: full MELD (13,708 clips) on N nodes.

Where it runs: by default a local Ray of `--cpus` CPUs and a local store. `--cluster`: a head (no
CPUs) and two `ray start` worker nodes of `--cpus`/2 CPUs each (`infra/ray_nodes.py`), MELD and the
stores on a local S3 server (SeaweedFS); `--kill-node` then preprocesses the smallest size once more
and SIGKILLs one worker node when half its clips are written, and reports that run's time against the
undisturbed one, with every key stored once. `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

MELD_CLIPS = 13_708
GOALS = {"clips_per_s": 0.85, "driver_rss": 1.2, "fragments": 4}
WARM_UP = 8  # clips of an uncounted first run
UTTERANCES_PER_DIALOGUE = 5.5  # the bank's dialogues: 3-8 turns
console = Console()


# ---- one size, in a driver process of its own ----------------------------------------------------
def run_one(args: argparse.Namespace) -> None:
    """The child: preprocess the first `--one` train clips of `--meld` into `--store`; print one JSON line."""
    import ray

    from featurestore import Store
    from infra.config import load_config
    from infra.runtime import OFFLINE_ENV, configure_offline
    from pipelines import job

    # when each writer's result reaches the driver (instrumentation only): the steady rate, start-up aside
    arrivals: list[tuple[float, int]] = []
    add = job.FragmentCommitter.add

    def timed_add(committer, batch):
        arrivals.append((time.perf_counter(), len(batch.keys)))
        return add(committer, batch)

    job.FragmentCommitter.add = timed_add
    configure_offline()
    if args.address:
        ray.init(address=args.address, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": OFFLINE_ENV})
    else:
        ray.init(num_cpus=args.cpus, object_store_memory=args.object_store_mb * 2**20, include_dashboard=False, _temp_dir=args.temp,
                 logging_level="WARNING", runtime_env={"env_vars": OFFLINE_ENV})  # fmt: skip
    settings = [f"preprocess.meld_root={args.meld}", f"paths.store={args.store}", "preprocess.splits=[train]",
                f"preprocess.limit={args.one}", *args.set]  # fmt: skip
    report = job.run_preprocess(load_config(None, settings))
    dataset = Store.open(args.store).lance_dataset()
    keys = dataset.to_table(columns=["key"]).column("key").to_pylist()
    result = dict(
        clips=report.total, embedded=report.embedded, seconds=report.seconds, media_seconds=report.media_seconds,
        upkeep_seconds=report.upkeep.seconds if report.upkeep else None,
        driver_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, commits=report.commits,
        fragments=len(dataset.get_fragments()), versions=len(dataset.versions()), rows=len(keys), unique_keys=len(set(keys)),
        failures=sum(report.failures.values()),
        steady_clips_per_s=second_half_rate(arrivals),
    )  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


def second_half_rate(arrivals: list[tuple[float, int]]) -> float | None:
    """Clips/s over the job's second half: from the writer result that completes half of the clips to the
    last one (start-up and the pipeline's filling left out; the store then holds half of the rows)."""
    total, done = sum(n for _, n in arrivals), 0
    for i, (at, rows) in enumerate(arrivals):
        done += rows
        if done >= total / 2:
            later = arrivals[i + 1 :]
            return sum(n for _, n in later) / (later[-1][0] - at) if later else None
    return None


def spilled_mib(root: Path) -> float:
    """Object-store spill so far under a Ray temp folder: each raylet logs its running total
    ("Spilled N MiB, M objects, ..."); the last figure of every raylet, summed."""
    total = 0.0
    for log in root.rglob("raylet.out"):
        figures = re.findall(r"Spilled (\d+) MiB", log.read_text(errors="replace"))
        total += float(figures[-1]) if figures else 0.0
    return total


# ---- the driver of the benchmark ----------------------------------------------------------------
def mini_meld(work: Path, clips: int) -> Path:
    """A generated mini-MELD with at least `clips` train clips, in `work` (reused when big enough)."""
    from infra.config import SynthConfig
    from pipelines.synth import generate, read_ground_truth

    out = work / "mini-meld"
    if (out / "ground_truth.jsonl").is_file():
        have = sum(t["split"] == "train" and bool(t["clip"]) for t in read_ground_truth(out).values())
        if have >= clips:
            return out
        shutil.rmtree(out)
    dialogues = math.ceil(clips / UTTERANCES_PER_DIALOGUE * 1.1) + 2
    console.print(f"generating a mini-MELD of {dialogues} dialogues for {clips} train clips into {out} (once) ...")
    fractions = {"train": 0.99, "dev": 0.005, "test": 0.005}
    generate(SynthConfig(out=out, dialogues=dialogues, seed=0, use_bank=True, workers=os.cpu_count() or 1, split_fractions=fractions))
    have = sum(t["split"] == "train" and bool(t["clip"]) for t in read_ground_truth(out).values())
    if have < clips:
        raise SystemExit(f"error: the generated mini-MELD has {have} train clips, fewer than {clips}")
    return out


class Where:
    """Where each size runs: a local Ray and store, or a `ray start` cluster with data on S3."""

    def __init__(self, args: argparse.Namespace, work: Path, meld: Path):
        self.args, self.work, self.meld = args, work, str(meld)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.nodes = self.server = None
        self.ray_root = Path(tempfile.mkdtemp(prefix="merg-scale-"))  # short: Ray's socket paths
        if args.cluster:
            try:
                self._start_cluster(meld)
            except BaseException:
                self.close()
                raise

    def _start_cluster(self, meld: Path) -> None:
        from featurestore import storage
        from infra.ray_nodes import RayNodes
        from infra.s3server import S3Server

        self.server = S3Server(self.work / "s3").start()
        storage.configure(self.server.settings())
        if not storage.exists("s3://scale"):  # the server's data folder is kept between runs
            self.server.create_bucket("scale")
        console.print(f"uploading {meld} to s3://scale/mini-meld ...")
        storage.upload_tree(meld, "s3://scale/mini-meld")
        self.meld = "s3://scale/mini-meld"
        per_node = max(1, self.args.cpus // 2)
        self.nodes = RayNodes(self.ray_root, object_store_mb=self.args.object_store_mb, env={"PYTHONPATH": self.env["PYTHONPATH"]})
        self.nodes.start_head(num_cpus=0)
        self.workers = [self.nodes.add_worker("w1", num_cpus=per_node), self.nodes.add_worker("w2", num_cpus=per_node)]
        self.nodes.wait_until_alive(3)
        self.env = {**self.nodes.env, **self.server.env()}

    def store(self, name: str) -> str:
        if self.server:
            return f"s3://scale/{name}"
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return str(path)

    def run(self, clips: int, store: str, kill_when_written: int | None = None) -> dict:
        """One size in a child process; with `kill_when_written`, SIGKILL worker w2 once that many of the
        job's data files are in the store."""
        if self.server:
            _remove_prefix(store)
        temp = self.ray_root / f"local-{clips}-{int(time.time())}"
        command = [sys.executable, str(Path(__file__).resolve()), "--one", str(clips), "--meld", self.meld, "--store", store,
                   "--cpus", str(self.args.cpus), "--object-store-mb", str(self.args.object_store_mb), "--temp", str(temp),
                   *(["--address", self.nodes.address] if self.nodes else []), *(a for s in self.args.set for a in ("--set", s))]  # fmt: skip
        spill_before = spilled_mib(self.ray_root)
        log = self.work / f"run-{clips}{'-killed' if kill_when_written else ''}.log"
        started = time.perf_counter()
        with log.open("w") as out:
            child = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            killed_at = self._kill_when(child, store, kill_when_written) if kill_when_written else None
            child.wait()
        wall = time.perf_counter() - started
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            raise SystemExit(f"error: benchmarks/scale.py: the {clips}-clip run failed (exit {child.returncode}); see {log}")
        result = json.loads(lines[-1][len("RESULT "):])
        result.update(wall_seconds=wall, spilled_mib=spilled_mib(self.ray_root) - spill_before, killed_at_s=killed_at)
        return result

    def _kill_when(self, child: subprocess.Popen, store: str, written: int) -> float | None:
        from featurestore import storage

        data = storage.join(store, "utterances.lance", "data")
        started = time.perf_counter()
        while child.poll() is None:
            if len(storage.list_dir(data)) >= written:
                self.nodes.kill(self.workers[1])
                return time.perf_counter() - started
            time.sleep(0.5)
        return None

    def close(self) -> None:
        if self.nodes:
            self.nodes.stop()
        if self.server:
            self.server.stop()
        shutil.rmtree(self.ray_root, ignore_errors=True)


def _remove_prefix(uri: str) -> None:
    from featurestore import storage

    fs, path = storage.filesystem(uri)
    if storage.exists(uri):
        fs.delete_dir(path)


def plan(sizes: list[int], budget_s: float, spent_s: float, last: dict | None) -> int | None:
    """The next size to run: as given, or cut to what fits in the rest of the budget (None: nothing)."""
    size = sizes[0]
    if last is None:
        return size
    per_clip = last["wall_seconds"] / last["clips"]
    fits = int((budget_s - spent_s) / per_clip) // 10 * 10
    if fits >= size:
        return size
    return fits if fits > last["clips"] * 1.5 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,400,1600", help="clips per run, smallest first")
    parser.add_argument("--budget-min", type=float, default=20.0, help="the runs' total time budget (minutes)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (with --cluster: over two worker nodes)")
    parser.add_argument("--object-store-mb", type=int, default=512, help="object store per Ray node (MiB)")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "scale", help="mini-MELD (kept), stores, logs")
    parser.add_argument("--cluster", action="store_true", help="head + two `ray start` workers, MELD and the stores on a local S3 server")
    parser.add_argument("--kill-node", action="store_true", help="with --cluster: the smallest size again, a worker node killed halfway")
    parser.add_argument("--node-cpus", type=int, default=8, help="CPUs of a node in the full-MELD estimate")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here (default: WORK/scale.json)")
    parser.add_argument("--asd", default="none", choices=("none", "sync"),
                        help="speaker stage (none: its cost per clip does not depend on the job's size, see benchmarks/asd.py)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="a config override for every run")
    # the child's own arguments
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--meld", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--temp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args)
    if args.kill_node and not args.cluster:
        parser.error("--kill-node needs --cluster")

    args.set = [f"preprocess.asd_method={args.asd}", *args.set]
    sizes = sorted(int(s) for s in args.sizes.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    console.print(f"load before the runs: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    meld = mini_meld(args.work, sizes[-1])
    where = Where(args, args.work, meld)
    results: list[dict] = []
    killed = None
    try:
        console.print(f"warming up ({WARM_UP} clips, not counted: first reads of the clips and the model code) ...")
        where.run(WARM_UP, where.store("store-warm-up"))
        started = time.perf_counter()
        while sizes:
            size = plan(sizes, args.budget_min * 60, time.perf_counter() - started, results[-1] if results else None)
            if size is None:
                console.print(f"[yellow]sizes {sizes} do not fit in the {args.budget_min:g}-minute budget: not run[/]")
                break
            if size != sizes[0]:
                console.print(f"[yellow]{sizes[0]} clips would not fit in the budget: {size} instead[/]")
            sizes.pop(0)
            console.print(f"preprocessing {size} clips ...")
            results.append(where.run(size, where.store(f"store-{size}")))
            r = results[-1]
            console.print(f"  {r['clips']} clips in {r['media_seconds']:.0f} s, "
                          f"{r['steady_clips_per_s'] or 0:.2f} clips/s in its second half, "
                          f"driver {r['driver_rss_mb']:.0f} MiB, {r['fragments']} fragments, {r['versions']} versions")  # fmt: skip
        if args.kill_node and results:
            size = results[0]["clips"]
            console.print(f"preprocessing {size} clips twice more, back to back: undisturbed, "
                          "then worker node w2 killed when half are written ...")
            undisturbed = where.run(size, where.store(f"store-{size}-again"))
            write_batch = _write_batch(args.set)
            killed = where.run(size, where.store(f"store-{size}-killed"), kill_when_written=max(1, size // write_batch // 2))
            killed["undisturbed_seconds"] = undisturbed["seconds"]
    finally:
        where.close()
    load = os.getloadavg()[0]
    summary = summarise(results, killed, args, load)
    out = args.json or args.work / "scale.json"
    out.write_text(json.dumps(summary, indent=2))
    console.print(f"figures written to {out}")


def _write_batch(overrides: list[str]) -> int:
    from infra.config import load_config

    return load_config(None, overrides).preprocess.write_batch


def summarise(results: list[dict], killed: dict | None, args: argparse.Namespace, load: float) -> dict:
    if not results:
        raise SystemExit("error: benchmarks/scale.py: no size was run")
    if args.cluster:
        where = f"cluster: head + 2 `ray start` workers of {max(1, args.cpus // 2)} CPUs, data on S3"
    else:
        where = f"local Ray, {args.cpus} CPUs, local store"
    table = Table(title=f"preprocessing cost by size ({where}; load {load:.1f} on {os.cpu_count()} cores)")
    for column in ("clips", "clips/s 2nd half", "clips/s job", "job s", "driver RSS MiB", "spill MiB", "frags", "versions", "once"):
        table.add_column(column, justify="right")
    for r in results:
        r["clips_per_s"] = r["clips"] / r["media_seconds"]
        table.add_row(str(r["clips"]), f"{r['steady_clips_per_s'] or 0:.2f}", f"{r['clips_per_s']:.2f}", f"{r['seconds']:.0f}",
                      f"{r['driver_rss_mb']:.0f}", f"{r['spilled_mib']:.0f}", str(r["fragments"]), str(r["versions"]),
                      "yes" if r["rows"] == r["unique_keys"] == r["clips"] else "NO")  # fmt: skip
    console.print(table)

    small, large = results[0], results[-1]
    ratios = {
        "clips_per_s": (large["steady_clips_per_s"] or 0) / (small["steady_clips_per_s"] or float("nan")),
        "driver_rss": large["driver_rss_mb"] / small["driver_rss_mb"],
        "fragments": large["fragments"],
    }
    met = {
        "clips_per_s": ratios["clips_per_s"] >= GOALS["clips_per_s"],
        "driver_rss": ratios["driver_rss"] <= GOALS["driver_rss"],
        "fragments": all(r["fragments"] <= GOALS["fragments"] for r in results),
    }
    goals = Table(title=f"{large['clips']} clips against {small['clips']}")
    for column in ("measure", "figure", "goal", "met"):
        goals.add_column(column)
    for measure, figure, goal, ok in (
        ("clips/s over the job's second half, largest / smallest", f"{ratios['clips_per_s']:.2f}x", f">= {GOALS['clips_per_s']}x", met["clips_per_s"]),
        ("driver peak RSS, largest / smallest", f"{ratios['driver_rss']:.2f}x", f"<= {GOALS['driver_rss']}x", met["driver_rss"]),
        ("fragments after the job (most of any size)", str(max(r["fragments"] for r in results)), f"<= {GOALS['fragments']}", met["fragments"]),
    ):  # fmt: skip
        goals.add_row(measure, figure, goal, _yes(ok))
    console.print(goals)

    # full MELD from the largest size's cost per clip: CPU-seconds a clip, spread over the nodes' CPUs
    cpu_s_per_clip = args.cpus / (large["steady_clips_per_s"] or large["clips_per_s"])
    fixed_s = max(0.0, large["seconds"] - large["clips"] * cpu_s_per_clip / args.cpus)  # start-up and upkeep, paid once
    estimate = {n: (MELD_CLIPS * cpu_s_per_clip / (n * args.node_cpus) + fixed_s) / 3600 for n in (1, 4, 16)}
    console.print(f"full MELD ({MELD_CLIPS:,} clips) at {cpu_s_per_clip:.2f} CPU-s a clip (speaker stage {args.asd}) "
                  f"+ {fixed_s:.0f} s once: "
                  + ", ".join(f"{n} node{'s' * (n > 1)} of {args.node_cpus} CPUs ≈ {h * 60:.0f} min" for n, h in estimate.items())
                  + " (mini-MELD's clips: 480x270, 0.5-6 s; MELD's are larger, see the README)")  # fmt: skip

    summary = {"where": where, "load": load, "cores": os.cpu_count(), "settings": args.set, "budget_min": args.budget_min, "sizes": results,
               "ratios": ratios, "goals": GOALS, "met": met, "cpu_seconds_per_clip": cpu_s_per_clip, "fixed_seconds": fixed_s,
               "full_meld_hours": {f"{n}x{args.node_cpus}cpu": h for n, h in estimate.items()}}  # fmt: skip
    if killed:
        once = killed["rows"] == killed["unique_keys"] == killed["clips"]
        ratio = killed["seconds"] / killed["undisturbed_seconds"]
        console.print(f"a worker node killed after {killed['killed_at_s'] or 0:.0f} s of {killed['seconds']:.0f}: the job took "
                      f"{ratio:.2f}x the undisturbed run just before it (the rest of the work on half the CPUs: ≈ 1.5x "
                      f"expected), every key stored once: {_yes(once)}")  # fmt: skip
        summary["node_killed"] = {**killed, "time_ratio": ratio, "rows_once": once}
    return summary


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    main()
