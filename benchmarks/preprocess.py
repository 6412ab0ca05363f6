"""Preprocessing benchmark: merg's Ray Data job against the reference system's way, same small model.

    .venv/bin/python benchmarks/preprocess.py [--dialogues 20] [--meld-root DIR]

On a generated mini-MELD (>= 200 clips) it prints clips/s for the same work done three ways
(decode + ImageBind, no speaker detection, as the reference pipeline's embedding step):
  (a) decode only, on all cores: the ceiling on this machine;
  (b) the reference system's way: sequential per clip, ffmpeg to a wav file, encode batch 1, one
      .npy file per utterance;
  (c) merg's job (`run_preprocess`) on all cores, into a fresh store;
with the ratios (c)/(b) (goal >= 2x) and (c)/(a) (goal >= 60%); then the same (a) and (c) with the
active-speaker stage on (`sync`), to show what it costs. With a GPU, (c) runs its encoder actors on
the GPU and the table says so.

`--encoder-only` times the job's encoder stage alone (the callable its Ray actors hold) on batches of
decoded-shape inputs, per ImageBind size and `--dtypes` (fp32 first: each other dtype's clips/s is
divided by it and its embeddings compared with its cosine): what one GPU (or CPU) can encode, with no
clips, no Ray.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from infra.config import SynthConfig, load_config
from pipelines.decode import SpeakerSettings, decode_clip
from pipelines.imagebind import ImageBindEncoder, audio_features, short_side_resize, video_frame_indices
from pipelines.job import run_preprocess
from pipelines.meld import read_splits


def _clips(root: Path) -> list[tuple[str, Path]]:
    return [(r.key, r.clip_path) for rd in read_splits(root).values() for r in rd.records if r.clip_path]


def _decode_only(item: tuple[str, Path], speaker: SpeakerSettings) -> bool:
    return decode_clip(item[0], item[1], speaker=speaker).failure is None


def decode_only(clips, workers: int, asd: str) -> float:
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(partial(_decode_only, speaker=SpeakerSettings(method=asd)), clips, chunksize=4))
    return len(clips) / (time.perf_counter() - start)


def reference_way(clips, out: Path) -> float:
    """Per clip: ffmpeg -> 16 kHz wav on disk, read it back, frames, encode with batch 1, save .npy."""
    import decord

    encoder = ImageBindEncoder(seed=0)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for key, path in clips:
        wav = out / (key.replace("/", "_") + ".wav")
        result = subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(path), "-ac", "1",
                                 "-ar", "16000", str(wav)], capture_output=True)  # fmt: skip
        try:
            reader = decord.VideoReader(str(path))
            indices = video_frame_indices(len(reader), reader.get_avg_fps())
            frames = reader.get_batch(indices.reshape(-1).tolist()).asnumpy().reshape(*indices.shape, *reader[0].shape)
            vision = encoder.encode_vision(short_side_resize(frames)[None])
        except Exception:  # noqa: BLE001 - the reference code skipped clips that failed
            continue
        embeddings = {"vision": vision[0]}
        if result.returncode == 0:
            with wave.open(str(wav)) as fh:
                pcm = np.frombuffer(fh.readframes(fh.getnframes()), np.int16).astype(np.float32) / 32768
            if pcm.size > 400:
                embeddings["audio"] = encoder.encode_audio(audio_features(pcm)[None])[0]
        np.save(out / (key.replace("/", "_") + ".npy"), embeddings)
    return len(clips) / (time.perf_counter() - start)


def merg_job(root: Path, store: Path, gpus: float, asd: str, extra: list[str] = ()) -> float:
    from infra.runtime import init_ray

    init_ray()  # a cluster is up before a job runs; starting one is not the job's cost
    overrides = [f"preprocess.meld_root={root}", f"paths.store={store}", f"preprocess.encoder_gpus={gpus}",
                 f"preprocess.asd_method={asd}", *extra]  # fmt: skip
    report = run_preprocess(load_config(None, overrides))
    return (report.total - report.text_only) / report.media_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=int, default=40)
    parser.add_argument("--meld-root", type=Path, help="use this MELD-layout folder instead of generating one")
    parser.add_argument("--pool-only", action="store_true",
                        help="only merg's job, once per ImageBind size in --sizes (the GPU check's encoder-pool figure)")  # fmt: skip
    parser.add_argument("--encoder-only", action="store_true",
                        help="only the encoder stage on decoded-shape batches, per size in --sizes (no clips, no Ray)")  # fmt: skip
    parser.add_argument("--batches", type=int, default=4, help="timed batches per size for --encoder-only")
    parser.add_argument("--sizes", default="small", help="ImageBind sizes for --pool-only / --encoder-only: small,huge (random init)")
    parser.add_argument("--dtypes", default="float32",
                        help="encoder dtypes for --encoder-only, float32 first (the baseline): float32,bfloat16,float16")  # fmt: skip
    parser.add_argument("--encoder-actors", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.encoder_only:
        encoder_only(args)
        return
    work = Path(tempfile.mkdtemp(prefix="merg-bench-pre-"))
    try:
        root = args.meld_root
        if root is None:
            from pipelines.synth import generate

            root = work / "mini-meld"
            generate(SynthConfig(out=root, dialogues=args.dialogues, seed=0, use_bank=True))
        clips = _clips(root)
        if len(clips) < 200 and args.meld_root is None:
            print(f"note: only {len(clips)} clips; pass --dialogues > {args.dialogues} for >= 200")
        workers = os.cpu_count() or 1
        import torch

        gpus = 1.0 / args.encoder_actors if torch.cuda.is_available() else 0.0
        if args.pool_only:
            pool_only(args, root, work, gpus, len(clips))
            return
        a = decode_only(clips, workers, "none")  # process pools fork: run them before Ray starts
        a_asd = decode_only(clips, workers, "sync")
        b = reference_way(clips, work / "reference")
        c = merg_job(root, work / "store", gpus, "none")
        c_asd = merg_job(root, work / "store-asd", gpus, "sync")
        table = Table(title=f"preprocessing {len(clips)} clips, ImageBind small (random init), {workers} CPU cores"
                      + (", encoder on GPU" if gpus else ""))  # fmt: skip
        for column in ("way", "clips/s", "ratio", "goal"):
            table.add_column(column, justify="left" if column == "way" else "right")
        table.add_row("(a) decode only, all cores (ceiling)", f"{a:.2f}", "", "")
        table.add_row("(b) reference: sequential, ffmpeg->wav, batch 1, file per clip", f"{b:.2f}", "", "")
        table.add_row("(c) merg job (Ray Data), all cores", f"{c:.2f}", "", "")
        table.add_row("(c) / (b)", "", f"{c / b:.2f}x", ">= 2x")
        table.add_row("(c) / (a)", "", f"{c / a:.0%}", ">= 60%")
        table.add_row("(a') decode + active-speaker stage (sync), all cores", f"{a_asd:.2f}", "", "")
        table.add_row("(c') merg job with the active-speaker stage", f"{c_asd:.2f}", f"{c_asd / a_asd:.0%} of (a')", "")
        Console(width=140).print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pool_only(args, root: Path, work: Path, gpus: float, clips: int) -> None:
    """merg's job with its encoder pool on the GPU (if any), per ImageBind size; speaker stage off."""
    import json

    import torch

    results: dict = {}
    for size in args.sizes.split(","):
        extra = [f"preprocess.imagebind_size={size}", f"preprocess.encoder_actors={args.encoder_actors}",
                 f"preprocess.batch_size={args.batch_size}"]  # fmt: skip
        results[size] = {"clips_per_s": merg_job(root, work / f"store-{size}", gpus, "none", extra)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = Table(title=f"merg preprocessing job, {clips} clips, {args.encoder_actors} encoder actor(s) on {device}")
    table.add_column("ImageBind (random init)")
    table.add_column("clips/s", justify="right")
    for size, r in results.items():
        table.add_row(size, f"{r['clips_per_s']:.2f}")
    Console(width=140).print(table)
    if args.json:
        args.json.write_text(json.dumps(dict(results, device=device, clips=clips), indent=2))


def encoder_only(args) -> None:
    """The job's ImageBind stage on random decoded-shape batches (audio features and frames for every row),
    per size and dtype; each dtype's embeddings are compared with fp32's (same seed, same weights)."""
    import json

    import torch

    from pipelines.job import _AUDIO_SHAPE, _FRAMES_SHAPE, ImageBindStage

    rng = np.random.default_rng(0)
    n = args.batch_size
    batch = {"key": np.array([f"bench/{i}" for i in range(n)], dtype=object),
             "has_audio_feat": np.ones(n, bool), "has_frames": np.ones(n, bool),
             "audio_feat": rng.standard_normal((n, *_AUDIO_SHAPE), dtype=np.float32),
             "frames": rng.integers(0, 256, (n, *_FRAMES_SHAPE), dtype=np.uint8),
             "fail_stage": np.full(n, "", object), "fail_reason": np.full(n, "", object),
             "fail_detail": np.full(n, "", object)}  # fmt: skip
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "float32":
        sys.exit(f"--dtypes must start with float32, the baseline (got {args.dtypes})")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    runs: list[dict] = []
    for size in args.sizes.split(","):
        baseline = None
        for dtype in dtypes:
            stage = ImageBindStage(checkpoint=None, size=size, seed=0, dtype=dtype)
            out = stage(batch)  # warm-up (kernels, allocator); its embeddings are compared with fp32's
            if any(out["fail_reason"]):
                sys.exit(f"ImageBind {size} in {dtype} failed: {set(out['fail_detail'])}")
            baseline = baseline or out
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.batches):
                stage(batch)  # returns numpy: every batch has finished on the device
            seconds = time.perf_counter() - start
            runs.append({"size": size, "dtype": dtype, "clips_per_s": n * args.batches / seconds,
                         "speedup": None, "min_cosine_to_fp32": min_cosine(out, baseline),
                         "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None})  # fmt: skip
            runs[-1]["speedup"] = runs[-1]["clips_per_s"] / next(r for r in runs if r["size"] == size)["clips_per_s"]
            if args.json:  # after each run: a time limit that stops the rest keeps these
                args.json.write_text(json.dumps(dict(runs=runs, device=device, batch_size=n), indent=2))
            del stage
            if cuda:
                torch.cuda.empty_cache()
    table = Table(title=f"ImageBind encoder stage, batch {n} x {args.batches}, audio + vision per clip, {device}")
    for column in ("ImageBind (random init)", "dtype", "clips/s", "vs fp32", "min cosine to fp32", "peak memory (MB)"):
        table.add_column(column, justify="left" if column in ("ImageBind (random init)", "dtype") else "right")
    for r in runs:
        table.add_row(r["size"], r["dtype"], f"{r['clips_per_s']:.2f}", f"{r['speedup']:.2f}x",
                      f"{r['min_cosine_to_fp32']:.5f}", f"{r['peak_mb']:,.0f}" if r["peak_mb"] else "-")  # fmt: skip
    Console(width=140).print(table)


def min_cosine(out: dict, baseline: dict) -> float:
    """The smallest cosine similarity, over rows and both modalities, between two stage outputs."""
    worst = 1.0
    for column in ("audio_raw", "vision_raw"):
        a, b = out[column].astype(np.float64), baseline[column].astype(np.float64)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        worst = min(worst, float(cosine.min()))
    return worst


if __name__ == "__main__":
    main()
