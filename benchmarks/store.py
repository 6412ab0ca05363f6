"""Feature-store benchmark: the store as the preprocessing job leaves it, and Lance against Parquet.

    .venv/bin/python benchmarks/store.py [--rows 13708 137080] [--dim 1024]                       # the job's store
    .venv/bin/python benchmarks/store.py --parquet [--rows 15000 150000] [--queries 50] [--similar-only]

By default, per scale (MELD's 13,708 rows, and 10x), the store is built the job's way: writer tasks'
fragments of `preprocess.write_batch` rows (audio, vision and fused vectors), committed by the driver's
`FragmentCommitter` every `--rows-per-commit` rows (merging small fragments every
`preprocess.compact_every`), then the job's upkeep (`Store.optimize`). It prints
an emotion-filtered read and a key lookup on that store, before and after upkeep, against a fully
compacted copy (every row written at once, the same indexes) measured in the same run (interleaved),
each ratio next to its goal (within 1.2x of the copy).

With `--parquet`, per scale it prints one table:
- emotion-filtered read of key + text + fused_emb: Lance (BITMAP index) vs the same data in one
  Parquet file read with pyarrow and then filtered (the baseline), and vs Parquet with predicate
  pushdown (`filters=`), for honesty;
- `similar` k=10 with an emotion prefilter: exact, and with the IVF_PQ index (p50/p95 latency,
  recall@10 of the indexed answer against the exact one): the cold Lance path;
- the same through the warm in-memory index (`Store.similar(..., warm=True)`, `featurestore/index.py`)
  for a rare filter (fear, ~3%: its exact path) and a broad one (neutral, ~47%: its reduced path),
  each against Lance's exact answer, beside Lance's own latency for that filter;
- write throughput (rows/s) and the cost of an idempotent re-write of the same rows.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from featurestore.index import warm_index
from featurestore.store import Store
from featurestore.synthetic import synthetic_utterances
from infra.config import PreprocessConfig

COLUMNS = ["key", "text", "fused_emb"]


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Median seconds over `repeat` runs, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def latencies(fn, queries: list[np.ndarray]) -> tuple[np.ndarray, list]:
    seconds, answers = [], []
    for q in queries:
        start = time.perf_counter()
        answers.append(fn(q))
        seconds.append(time.perf_counter() - start)
    return np.array(seconds) * 1000, answers


def recall_at_10(answers: list, exact: list) -> float:
    return float(np.mean([
        len(set(a.column("key").to_pylist()) & set(e.column("key").to_pylist())) / 10 for a, e in zip(answers, exact)
    ]))  # fmt: skip


def warm_vs_cold(store: Store, queries: list[np.ndarray]) -> tuple[dict, float, float]:
    """`similar` k=10 through the warm index against Lance's exact answer, for a rare and a broad filter."""
    warm_s, index = timed(lambda: warm_index(store, now=True))
    measured = {}
    for label in ("fear", "neutral"):
        where = f"emotion = '{label}'"
        cold_ms, cold = latencies(lambda q: store.similar(q, k=10, where=where, use_index=False, warm=False), queries)
        hot_ms, hot = latencies(lambda q: store.similar(q, k=10, where=where, warm=True), queries * 4)  # cheap: 4 passes
        hot = hot[: len(queries)]
        path = "exact" if index._rows(where).reduced is None else f"{index.reduced_dim}-d scan + re-rank"
        measured[label] = (index._rows(where).positions.size, path, hot_ms, cold_ms, recall_at_10(hot, cold))
    return measured, warm_s, index.estimated_recall


def add_warm_rows(table: Table, measured: dict, warm_s: float, estimated_recall: float) -> None:
    for label, (n, path, hot_ms, cold_ms, hot_recall) in measured.items():
        table.add_row(
            f"similar k=10, warm index, {label} ({n:,} rows, {path}): p50 / p95 ms",
            f"{np.median(hot_ms):.2f} / {np.percentile(hot_ms, 95):.2f}",
            f"{np.median(cold_ms):.1f} / {np.percentile(cold_ms, 95):.1f} (Lance exact)",
            f"{np.median(cold_ms) / np.median(hot_ms):.0f}x", "p50 <= 5 ms at 150k",
        )  # fmt: skip
        table.add_row(f"  recall@10 vs exact, {label}", f"{hot_recall:.3f}", "1.000", "", ">= 0.99")
    table.add_row("warm index build (read + PCA + recall check), s", f"{warm_s:.1f}",
                  f"estimated recall@10 {estimated_recall:.3f}", "", "")  # fmt: skip


def bench_similar(rows: int, dim: int, n_queries: int, workdir: Path, console: Console) -> Table:
    """`--similar-only`: fused_emb alone, written in large batches; the `similar` rows only (cold Lance
    exact vs the warm index), within ~4 GB and a few minutes at 150k rows."""
    store = Store.open(workdir / "store", create=True, embedding_dim=dim)
    step = 25_000
    for start in range(0, rows, step):
        store.write_utterances(synthetic_utterances(min(step, rows - start), dim, seed=start, start=start, modalities=False))
    store.create_indexes(scalar=True)
    keys = store.query(columns=["key"]).column("key").to_pylist()
    rng = np.random.default_rng(1)
    queries = [store.vector_of(keys[i]) for i in rng.choice(rows, n_queries, replace=False)]
    table = Table(title=f"similar at {rows:,} rows x {dim}-d fused_emb (cold Lance vs warm in-memory index)")
    for column in ("measure", "merg", "baseline", "ratio", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    add_warm_rows(table, *warm_vs_cold(store, queries))
    console.print(table)
    return table


def bench(rows: int, dim: int, n_queries: int, workdir: Path, console: Console) -> Table:
    data = synthetic_utterances(rows, dim, seed=0)
    batch = 5000
    store = Store.open(workdir / "store", create=True, embedding_dim=dim)
    write_s, _ = timed(lambda: [store.write_utterances(data.slice(i, batch)) for i in range(0, rows, batch)])
    rewrite_s, _ = timed(lambda: [store.write_utterances(data.slice(i, batch)) for i in range(0, rows, batch)])
    assert store.query(columns=["key"]).num_rows == rows
    keys = data.column("key").to_pylist()
    del data  # ~1.8 GB at 150k rows; the store holds it now
    parquet = workdir / "utterances.parquet"
    parquet_write_s, _ = timed(lambda: pq.write_table(store.query(), parquet))
    store.create_indexes(scalar=True)

    def lance_read():
        return store.query(emotion="joy", columns=COLUMNS)

    def parquet_read_then_filter():
        table = pq.read_table(parquet, columns=COLUMNS + ["emotion"])
        return table.filter(pc.equal(table.column("emotion"), "joy")).select(COLUMNS)

    def parquet_pushdown():
        return pq.read_table(parquet, columns=COLUMNS, filters=[("emotion", "=", "joy")])

    lance_s, lance_rows = timed(lance_read, repeat=5)
    baseline_s, base_rows = timed(parquet_read_then_filter, repeat=5)
    pushdown_s, _ = timed(parquet_pushdown, repeat=5)
    assert lance_rows.num_rows == base_rows.num_rows

    rng = np.random.default_rng(1)
    queries = [store.vector_of(keys[i]) for i in rng.choice(rows, n_queries, replace=False)]
    where = "emotion = 'sadness'"
    exact_ms, exact = latencies(lambda q: store.similar(q, k=10, where=where, use_index=False), queries)
    build_s, _ = timed(lambda: store.create_indexes(scalar=False, vectors=True))
    index_ms, approx = latencies(lambda q: store.similar(q, k=10, where=where, warm=False), queries)
    recall = recall_at_10(approx, exact)
    warm = warm_vs_cold(store, queries)

    table = Table(title=f"feature store at {rows:,} rows x {dim}-d embeddings (3 vectors per row)")
    for column in ("measure", "merg (Lance)", "baseline", "ratio", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        f"emotion-filtered read ({lance_rows.num_rows:,} rows), ms", f"{lance_s * 1000:.1f}",
        f"{baseline_s * 1000:.1f} (Parquet read+filter)", f"{baseline_s / lance_s:.1f}x", ">= 4x",
    )  # fmt: skip
    table.add_row(
        "  same, against Parquet with pushdown, ms", f"{lance_s * 1000:.1f}", f"{pushdown_s * 1000:.1f}",
        f"{pushdown_s / lance_s:.1f}x", "",
    )  # fmt: skip
    table.add_row(
        "similar k=10, emotion prefilter: p50 / p95 ms", f"{np.median(index_ms):.1f} / {np.percentile(index_ms, 95):.1f} (IVF_PQ)",
        f"{np.median(exact_ms):.1f} / {np.percentile(exact_ms, 95):.1f} (exact)",
        f"{np.median(exact_ms) / np.median(index_ms):.1f}x", "p50 <= 5 ms at 150k",
    )  # fmt: skip
    table.add_row("recall@10, IVF_PQ (nprobes 64, refine 20) vs exact", f"{recall:.3f}", "1.000", "", ">= 0.95")
    table.add_row("IVF_PQ build, s", f"{build_s:.1f}", "", "", "")
    add_warm_rows(table, *warm)
    table.add_row(
        "write, rows/s (5k-row upserts)", f"{rows / write_s:,.0f}", f"{rows / parquet_write_s:,.0f} (one Parquet file)",
        f"{(rows / write_s) / (rows / parquet_write_s):.2f}x", "",
    )  # fmt: skip
    table.add_row("idempotent re-write of all rows, s", f"{rewrite_s:.1f}", f"{write_s:.1f} (first write)",
                  f"{rewrite_s / write_s:.2f}x", "no duplicates")  # fmt: skip
    console.print(table)
    return table


def build_the_jobs_way(root: Path, rows: int, dim: int, write_batch: int, rows_per_commit: int) -> tuple[Store, float, int]:
    """A store written as `merg preprocess` writes it: writer fragments of `write_batch` rows, committed by
    the job's FragmentCommitter every `rows_per_commit` rows. Returns it, the seconds and the commits."""
    from featurestore.store import write_fragments
    from pipelines.job import FragmentCommitter, WrittenBatch

    store = Store.open(root, create=True, embedding_dim=dim)
    # as the job's, but its compaction rewrites in this process instead of Ray tasks
    committer = FragmentCommitter(store, interval_s=float("inf"), max_rows=rows_per_commit, compact_every=PreprocessConfig().compact_every)
    started = time.perf_counter()
    chunk = 2048  # synthetic rows made a chunk at a time: 10x MELD with three 1024-d vectors is ~1.7 GB
    for start in range(0, rows, chunk):
        data = synthetic_utterances(min(chunk, rows - start), dim, seed=start, start=start)
        for offset in range(0, data.num_rows, write_batch):
            written = write_fragments(root, data.slice(offset, write_batch), dim, dim)
            committer.add(WrittenBatch(written, written.keys, [], written.keys, len(written.keys)))
    committer.commit()
    return store, time.perf_counter() - started, committer.commits


def compacted_copy(store: Store, root: Path) -> Store:
    """Every row of `store` written at once into a new store, with the same scalar indexes."""
    copy = Store.open(root, create=True, embedding_dim=store.embedding_dim)
    lance.write_dataset(store.lance_dataset().to_table(), str(root / "utterances.lance"), mode="overwrite",
                        schema=store.lance_dataset().schema)  # fmt: skip
    copy.create_indexes(scalar=True)
    return copy


def interleaved(measures: dict[str, callable], repeat: int) -> dict[str, float]:
    """Median seconds of each measure, the measures taking turns (so load drift hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeat):
        for name, fn in measures.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_job_store(rows: int, dim: int, write_batch: int, rows_per_commit: int, workdir: Path, console: Console) -> Table:
    job, build_s, commits = build_the_jobs_way(workdir / "job", rows, dim, write_batch, rows_per_commit)
    fragments, versions = len(job.lance_dataset().get_fragments()), len(job.versions())
    keys = job.query(columns=["key"]).column("key").to_pylist()
    lookups = [keys[i] for i in np.random.default_rng(1).choice(rows, 50, replace=False)]
    copy = compacted_copy(job, workdir / "copy")

    def read(store):
        return lambda: store.query(emotion="joy", columns=COLUMNS)

    def lookup(store):
        return lambda: [store.vector_of(k) for k in lookups]

    before = interleaved({"read": read(job), "copy": read(copy)}, repeat=5)
    before.update({f"lookup {n}": s for n, s in interleaved({"job": lookup(job), "copy": lookup(copy)}, repeat=3).items()})
    upkeep = job.optimize()  # what the job runs after its last commit
    after = interleaved({"read": read(job), "copy": read(copy)}, repeat=9)
    after.update({f"lookup {n}": s for n, s in interleaved({"job": lookup(job), "copy": lookup(copy)}, repeat=9).items()})
    assert job.query(emotion="joy", columns=["key"]).num_rows == copy.query(emotion="joy", columns=["key"]).num_rows

    table = Table(title=f"the job's store at {rows:,} rows x 3 {dim}-d vectors: fragments of {write_batch} rows, "
                        f"{commits} commits of {rows_per_commit} rows ({build_s:.0f} s), then upkeep vs a compacted copy")  # fmt: skip
    for column in ("measure", "as the job leaves it", "compacted copy", "ratio", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    joy = copy.query(emotion="joy", columns=["key"]).num_rows
    for label, figures, goal in (("before upkeep", before, "(mid-job)"), ("after upkeep", after, "<= 1.2x")):
        table.add_row(f"emotion-filtered read ({joy:,} rows of key, text, fused_emb), ms, {label}",
                      f"{figures['read'] * 1000:.1f}", f"{figures['copy'] * 1000:.1f}", f"{figures['read'] / figures['copy']:.2f}x", goal)  # fmt: skip
        job_ms, copy_ms = figures["lookup job"] * 1000 / len(lookups), figures["lookup copy"] * 1000 / len(lookups)
        table.add_row(f"key lookup (vector_of), ms, {label}", f"{job_ms:.2f}", f"{copy_ms:.2f}", f"{job_ms / copy_ms:.2f}x", goal)
    table.add_row("fragments / versions", f"{fragments:,} / {versions:,} -> {upkeep.fragments_after} / {upkeep.versions_after}",
                  f"{len(copy.lance_dataset().get_fragments())} / {len(copy.versions())}", "", "fragments <= 4")  # fmt: skip
    table.add_row("upkeep (dedupe, indexes, compaction, old versions), s", f"{upkeep.seconds:.1f}", "", "", "")
    console.print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="default 13708 137080 (15000 150000 with --parquet)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--write-batch", type=int, default=PreprocessConfig().write_batch, help="rows per writer fragment")
    parser.add_argument("--rows-per-commit", type=int, default=256, help="rows per driver commit (the job commits every 30 s)")
    parser.add_argument("--parquet", action="store_true", help="Lance against Parquet, similar and writes (the earlier tables)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--similar-only", action="store_true", help="with --parquet: only the similar rows (fused_emb alone)")
    args = parser.parse_args()
    console = Console(width=200)
    for rows in args.rows or ([15_000, 150_000] if args.parquet else [13_708, 137_080]):
        workdir = Path(tempfile.mkdtemp(prefix=f"merg-bench-store-{rows}-"))
        try:
            if args.parquet:
                (bench_similar if args.similar_only else bench)(rows, args.dim, args.queries, workdir, console)
            else:
                bench_job_store(rows, args.dim, args.write_batch, args.rows_per_commit, workdir, console)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
