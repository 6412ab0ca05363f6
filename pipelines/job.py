"""The preprocessing job: MELD -> decode -> speaker -> ImageBind -> fuse -> feature store, on Ray Data.

    read manifest -> decode (CPU tasks) -> faces (S3FD actors) -> tracks (CPU) -> speaker scores
    (TalkNet actors) -> crops (CPU) -> ImageBind (actors) -> fuse -> write

Model stages are actor pools on GPUs (`num_gpus`) or, without one, CPU actors; the S3FD and TalkNet
stages exist only when their checkpoints are given (otherwise faces are Haar's and `sync` scores, and
the decode tasks find the tracks themselves).

Every CSV utterance ends up as one store row; a clip that is missing or bad gets its row with null
embeddings and a `failures` record saying why. The last stage's workers write their rows to the store
as Lance fragments themselves; the driver receives only the fragments' metadata and commits it every
`commit_interval_s` seconds (`Store.commit_fragments`: exactly once by key), so a killed job keeps what
was committed and loses at most the last interval's work. A re-run skips keys already stored with the
same clip and config hash (`force` recomputes). MELD and the store may be on object storage (s3://):
each decode task reads its clip from there itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from featurestore import Store, storage
from featurestore.store import WrittenFragments, write_fragments
from infra.config import MergConfig, PreprocessConfig
from infra.progress import progress_bar
from pipelines.decode import (
    DECODE_BASE_MEMORY, DecodedClip, SpeakerSettings, crop_speaker, decode_media, decode_memory, detect_faces_step,
    s3fd_model, score_step, talknet_model, track_step,
)  # fmt: skip
from pipelines.fusion import fuse, fused_width
from pipelines.imagebind import (
    AUDIO_CLIPS, FRAMES_PER_CLIP, IMAGE_SIZE, MEL_BINS, SIZES, TARGET_FRAMES, VIDEO_CLIPS,
    ImageBindEncoder, checkpoint_id, file_sha256, resolve_size,
)  # fmt: skip
from pipelines.media import check_clip_path, clip_geometry
from pipelines.meld import Utterance, read_splits

log = logging.getLogger(__name__)

PIPELINE_VERSION = "4"  # 2: active-speaker stage replaces the largest-face crop; 3: official numerics, shots;
# 4: `sync` scores the mouth's opening, not its motion
_AUDIO_SHAPE = (AUDIO_CLIPS, 1, MEL_BINS, TARGET_FRAMES)
_FRAMES_SHAPE = (VIDEO_CLIPS, FRAMES_PER_CLIP, IMAGE_SIZE, IMAGE_SIZE, 3)


@dataclass
class PreprocessReport:
    store: storage.Location
    store_version: int
    encoder: str
    encoder_checkpoint: str
    fusion: str
    config_hash: str
    total: int = 0
    skipped: int = 0
    embedded: int = 0  # rows written with at least one embedding
    text_only: int = 0  # rows written without media (no clip, or --no-media)
    failures: Counter = field(default_factory=Counter)  # (stage, reason) -> count, this run
    seconds: float = 0.0
    media_seconds: float = 0.0
    commits: int = 0  # commits of worker-written fragments
    upkeep: Any = None  # featurestore.store.UpkeepReport, when the job ran it


# ---- stages ----------------------------------------------------------------------------------------
# Between the decode and crop stages a row is {"key", "clip": DecodedClip, "clip_sha256"} (the clip's
# speaker work rides along, pickled); the crop stage turns it into fixed-shape arrays for the encoder.
# `storage_settings`: the driver's object-storage endpoint and credentials (featurestore.storage).
def decode_row(row: dict[str, Any], speaker: SpeakerSettings, storage_settings: dict | None = None) -> dict[str, Any]:
    """CPU stage: probe, audio, the speaker stage's frames and shot cuts; without an S3FD stage to wait
    for, the tracks too (so the clip's frames never leave the task). A clip in object storage is read
    from there by this task (into its own temp folder); its sha256 is taken from the bytes decoded."""
    storage.configure(storage_settings)
    path = row["path"] or None
    try:
        with storage.local_copy(path) if path else _no_file() as local:
            clip = decode_media(row["key"], str(local) if local else None, speaker)
            if not _has_s3fd_stage(speaker):
                track_step(clip, speaker.method == "talknet")
            sha = _clip_sha256(local) if local else None
    except (FileNotFoundError, storage.StorageError) as exc:  # an object gone since planning, or refused
        reason = "missing_file" if isinstance(exc, FileNotFoundError) else "unreadable"
        clip, sha = DecodedClip(key=row["key"], failure=("read", reason, f"{path}: {exc}"[:500])), None
    _point_at(clip, path)
    return {"key": row["key"], "clip": clip, "clip_sha256": sha or ""}


@contextmanager
def _no_file():
    yield None


def _point_at(clip: DecodedClip, path: str | None) -> None:
    """Name the clip by its own path or URI again (not a worker's temp copy), for the stages after."""
    clip.path = path
    if clip.speaker is not None and clip.speaker.clip.path:
        clip.speaker.clip.path = path


@contextmanager
def _clip_on_disk(clip: DecodedClip):
    """For a later stage that reads the clip's file again (decord): a clip in object storage is copied
    into this worker's temp folder for the step, so no stage depends on another stage's disk."""
    path = clip.path
    if not storage.is_uri(path):
        yield
        return
    with storage.local_copy(path) as local:
        _point_at(clip, str(local))
        try:
            yield
        finally:
            _point_at(clip, path)


class S3FDStage:
    """Actor stage: holds S3FD; faces on the frames of a batch of clips, frames batched across clips."""

    def __init__(self, checkpoint: str):
        _cpu_actor_threads()
        self.model = s3fd_model(checkpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        detect_faces_step(list(batch["clip"]), self.model)
        return batch


def track_row(row: dict[str, Any], talknet: bool, storage_settings: dict | None = None) -> dict[str, Any]:
    """CPU stage: tracks within shots (Haar faces when no S3FD stage ran); `sync` decides here."""
    storage.configure(storage_settings)
    with _clip_on_disk(row["clip"]):
        track_step(row["clip"], talknet)
    return {"key": row["key"], "clip": row["clip"], "clip_sha256": row["clip_sha256"]}


class TalkNetStage:
    """Actor stage: holds TalkNet; scores the tracks of a batch of clips, windows batched across clips."""

    def __init__(self, checkpoint: str):
        _cpu_actor_threads()
        self.model = talknet_model(checkpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        score_step(list(batch["clip"]), self.model)
        return batch


def crop_row(row: dict[str, Any], speaker: SpeakerSettings, storage_settings: dict | None = None) -> dict[str, Any]:
    """CPU stage: the speaker's face cut from ImageBind's frames, as fixed-shape arrays plus flags."""
    storage.configure(storage_settings)
    with _clip_on_disk(row["clip"]):
        cropped = crop_speaker(row["clip"], speaker)
    return {**clip_row(cropped), "clip_sha256": row["clip_sha256"]}


def clip_row(clip: DecodedClip) -> dict[str, Any]:
    """A decoded clip as the encoder stage's row (zeros where a modality is missing)."""
    stage, reason, detail = clip.failure or ("", "", "")
    box = clip.speaker_box or (np.nan,) * 4
    return {
        "key": clip.key,
        "duration": np.float32(clip.duration if clip.duration is not None else np.nan),
        "fps": np.float32(clip.fps if clip.fps is not None else np.nan),
        "has_audio_stream": clip.has_audio,
        "has_audio_feat": clip.audio is not None,
        "has_frames": clip.frames is not None,
        "face_visible": -1 if clip.face_visible is None else int(clip.face_visible),
        "speaker_box": np.asarray(box, np.float32),
        "asd_method": clip.asd_method or "",
        "asd_score": np.float32(clip.asd_score if clip.asd_score is not None else np.nan),
        "track_frames": clip.speaker_track_frames or 0,
        "audio_feat": clip.audio if clip.audio is not None else np.zeros(_AUDIO_SHAPE, np.float32),
        "frames": clip.frames if clip.frames is not None else np.zeros(_FRAMES_SHAPE, np.uint8),
        "fail_stage": stage,
        "fail_reason": reason,
        "fail_detail": detail[:500],
    }


def _cpu_actor_threads() -> None:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # CPU actors share the machine with the decode tasks


class ImageBindStage:
    """Actor stage: holds ImageBind; embeds the rows that have audio features and/or frames."""

    def __init__(self, checkpoint: str | None, size: str | None, seed: int, dtype: str = "float32"):
        _cpu_actor_threads()
        self.encoder = ImageBindEncoder(checkpoint=checkpoint, size=size, seed=seed, dtype=dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, dim = len(batch["key"]), self.encoder.embed_dim
        out = {k: v for k, v in batch.items() if k not in ("audio_feat", "frames")}
        out["audio_raw"], out["vision_raw"] = np.zeros((n, dim), np.float32), np.zeros((n, dim), np.float32)
        for flag, inputs, target, encode in (
            ("has_audio_feat", "audio_feat", "audio_raw", self.encoder.encode_audio),
            ("has_frames", "frames", "vision_raw", self.encoder.encode_vision),
        ):
            rows = np.flatnonzero(batch[flag])
            try:
                if rows.size:
                    out[target][rows] = encode(np.stack(batch[inputs][rows]))
            except Exception:  # noqa: BLE001 - one bad input must not fail its batch: retry row by row
                for row in rows:
                    try:
                        out[target][row] = encode(np.asarray(batch[inputs][row])[None])[0]
                    except Exception as exc:  # noqa: BLE001
                        out[flag] = np.array(out[flag], copy=True)
                        out[flag][row] = False
                        _record_failure(out, row, "encode", "encode_error", f"{inputs}: {type(exc).__name__}: {exc}")
        return out


def _record_failure(batch: dict[str, np.ndarray], row: int, stage: str, reason: str, detail: str) -> None:
    """Set a row's failure fields in a batch (unless it already carries one)."""
    if not batch["fail_reason"][row]:
        for column, value in (("fail_stage", stage), ("fail_reason", reason), ("fail_detail", detail[:500])):
            batch[column] = np.array(batch[column], dtype=object, copy=True)
            batch[column][row] = value


def fuse_batch(batch: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """CPU stage: normalised modalities and the fused vector."""
    audio, vision, fused = fuse(batch["audio_raw"], batch["vision_raw"], batch["has_audio_feat"], batch["has_frames"], mode)
    out = {k: v for k, v in batch.items() if k not in ("audio_raw", "vision_raw")}
    out["audio_emb"], out["vision_emb"], out["fused_emb"] = audio, vision, fused
    return out


# ---- the job --------------------------------------------------------------------------------------
def _metadata_row(u: Utterance, provenance: dict[str, Any]) -> dict[str, Any]:
    return dict(
        key=u.key, split=u.split, dialogue_id=u.dialogue_id, utterance_id=u.utterance_id, speaker=u.speaker,
        text=u.text, emotion=u.emotion, sentiment=u.sentiment, season=u.season, episode=u.episode,
        start_time=u.start_time, end_time=u.end_time, clip_path=str(u.clip_path) if u.clip_path else None,
        **provenance,
    )  # fmt: skip


def _vectors(matrix: np.ndarray, present: np.ndarray) -> pa.Array:
    width = matrix.shape[1]
    values = pa.array(matrix.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, width, mask=pa.array(~present))


def _media_rows(batch: dict[str, np.ndarray], meta: dict[str, dict]) -> pa.Table:
    """Join a result batch with the utterances' metadata into store rows."""
    keys = [str(k) for k in batch["key"]]
    table = pa.Table.from_pylist([dict(meta[k], clip_sha256=str(sha) or None) for k, sha in zip(keys, batch["clip_sha256"])])
    has_audio, has_frames = batch["has_audio_feat"].astype(bool), batch["has_frames"].astype(bool)
    face = batch["face_visible"].astype(int)
    box = batch["speaker_box"].astype(np.float32)
    columns = {
        "duration": pa.array(batch["duration"], pa.float32(), mask=np.isnan(batch["duration"])),
        "fps": pa.array(batch["fps"], pa.float32(), mask=np.isnan(batch["fps"])),
        "has_audio": pa.array(batch["has_audio_stream"].astype(bool)),
        "face_visible": pa.array([None if f < 0 else bool(f) for f in face], pa.bool_()),
        "asd_method": pa.array([str(m) or None for m in batch["asd_method"]], pa.string()),
        "asd_score": pa.array(batch["asd_score"], pa.float32(), mask=np.isnan(batch["asd_score"])),
        "speaker_track_frames": pa.array(batch["track_frames"], pa.int32(), mask=batch["track_frames"] == 0),
        "speaker_box": _vectors(np.nan_to_num(box), ~np.isnan(box).any(axis=1)),
        "audio_emb": _vectors(batch["audio_emb"], has_audio),
        "vision_emb": _vectors(batch["vision_emb"], has_frames),
        "fused_emb": _vectors(np.nan_to_num(batch["fused_emb"]), has_audio | has_frames),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def speaker_settings(pc: PreprocessConfig) -> SpeakerSettings:
    checkpoint = str(pc.talknet_checkpoint) if pc.talknet_checkpoint else None
    crops = str(pc.save_crops) if pc.save_crops else None
    s3fd = str(pc.s3fd_checkpoint) if pc.s3fd_checkpoint else None
    return SpeakerSettings(pc.asd_method, pc.asd_threshold, pc.detect_every, pc.crop_margin, checkpoint, crops, s3fd, pc.asd_faithful)


def preprocess_config_hash(pc: PreprocessConfig, encoder: str, weights: str) -> str:
    """What decides a row's embeddings: a change here means recompute."""
    relevant = dict(
        encoder=encoder, weights=weights, fusion=pc.fusion, pipeline=PIPELINE_VERSION, asd=pc.asd_method,
        asd_threshold=pc.asd_threshold, detect_every=pc.detect_every, crop_margin=pc.crop_margin,
        talknet=file_sha256(pc.talknet_checkpoint) if pc.talknet_checkpoint else None,
        s3fd=file_sha256(pc.s3fd_checkpoint) if pc.s3fd_checkpoint else None, asd_faithful=pc.asd_faithful,
        # only when not the default, so that stores written before the option keep their hashes
        **({"encoder_dtype": pc.encoder_dtype} if pc.encoder_dtype != "float32" else {}),
    )  # fmt: skip
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _hash_clips(records: list[Utterance]) -> dict[str, str | None]:
    """sha256 of the clips on a local disk (clips in object storage are hashed by their decode task)."""
    paths = {r.key: r.clip_path for r in records if r.clip_path is not None and not storage.is_uri(r.clip_path)}
    with ThreadPoolExecutor(8) as pool:  # hashlib releases the GIL
        return dict(zip(paths, pool.map(_clip_sha256, paths.values())))


def _clip_sha256(path: Path) -> str | None:
    """The clip's hash; None for a path that is no readable file (its decode task records why)."""
    if check_clip_path(path) is not None:
        return None
    try:
        return file_sha256(path)
    except OSError:  # gone or changed since the check: decoding will say what it found
        return None


def decode_memory_request(path: str, frames_out: bool = False, s3fd_input: bool = False) -> int:
    """Memory for decoding the clip at `path`, from its size (a clip that cannot be read fails fast);
    `frames_out`: the task hands the clip's frames on (to an S3FD stage), `s3fd_input` with them
    S3FD's faithful input."""
    geometry = clip_geometry(path)
    return decode_memory(*geometry, frames_out=frames_out, s3fd_input=s3fd_input) if geometry else DECODE_BASE_MEMORY


def _decoded(items: list[dict], pc: PreprocessConfig, storage_settings: dict | None = None):
    """Decode tasks that each request the memory their clip needs: clips are grouped by request
    (512 MiB steps, at most the largest node's memory), one map per group, the groups' outputs joined."""
    import ray

    # a request above every node's memory would never be scheduled: cap it at the largest node's
    cap = int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)) or None
    speaker = speaker_settings(pc)
    frames_out = _has_s3fd_stage(speaker)
    s3fd_input = frames_out and speaker.is_faithful
    with ThreadPoolExecutor(8) as pool:  # header reads only
        requests = list(pool.map(lambda item: decode_memory_request(item["path"], frames_out, s3fd_input), items))
    groups: dict[int, list[dict]] = {}
    for item, memory in zip(items, requests):
        groups.setdefault(min(memory, cap) if cap else memory, []).append(item)
    parts = [
        # one clip per decode task: its memory request is that clip's, and a task that hands its 25-fps
        # frames on (to an S3FD stage) holds one clip's worth, not a block's
        ray.data.from_items(group, override_num_blocks=len(group))
        # Declaring memory also keeps Ray from fusing decode into the next stage (ops with equal
        # resource requests are fused), so decode stays parallel CPU tasks.
        .map(decode_row, fn_kwargs={"speaker": speaker, "storage_settings": storage_settings}, num_cpus=1, memory=memory,
             compute=ray.data.TaskPoolStrategy(size=pc.decode_concurrency))  # fmt: skip
        for memory, group in sorted(groups.items())
    ]
    log.info("decode memory per task: %s", ", ".join(f"{len(g)} clips x {m / 1024**3:.1f} GiB" for m, g in sorted(groups.items())))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _has_s3fd_stage(speaker: SpeakerSettings) -> bool:
    return speaker.method != "none" and speaker.s3fd_checkpoint is not None


GPU_SPEAKER_BATCH_CLIPS = 4  # clips per S3FD / TalkNet call on a GPU (unless preprocess.asd_batch_clips)


def _speaker_pool(pc: PreprocessConfig) -> dict:
    """Ray Data arguments of the S3FD and TalkNet actor pools: as configured; else on GPUs one actor per
    model fed `GPU_SPEAKER_BATCH_CLIPS` clips a call (frames and windows batched across them), and on a
    CPU actors of one thread each, one clip a call (a CPU gains nothing from batching S3FD's frames), that
    Ray Data scales from one to the cluster's CPUs: there faithful S3FD is most of the job's work, and a
    single actor would leave the other cores idle once decode is done (README: "The preprocessing job")."""
    import ray

    on_gpu = pc.asd_gpus > 0
    if pc.asd_actors or on_gpu:
        pool = ray.data.ActorPoolStrategy(size=pc.asd_actors or 1)
    else:
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1))))
    batch = pc.asd_batch_clips or (GPU_SPEAKER_BATCH_CLIPS if on_gpu else 1)
    # like the encoder's, speaker actors take no CPU slot: on a CPU machine they share it with decode
    return dict(compute=pool, num_gpus=pc.asd_gpus, num_cpus=0, batch_size=batch, batch_format="numpy")


def _speaker_crops(decoded, pc: PreprocessConfig, storage_settings: dict | None = None):
    """decoded clips -> faces (S3FD actors) -> tracks (CPU) -> scores (TalkNet actors) -> crops (CPU)."""
    speaker = speaker_settings(pc)
    actors = _speaker_pool(pc)
    ds = decoded
    if _has_s3fd_stage(speaker):  # (otherwise the decode tasks tracked Haar's faces)
        ds = ds.map_batches(S3FDStage, fn_constructor_kwargs={"checkpoint": speaker.s3fd_checkpoint}, **actors)
        ds = ds.map(track_row, fn_kwargs={"talknet": speaker.method == "talknet", "storage_settings": storage_settings})
    if speaker.method == "talknet":
        ds = ds.map_batches(TalkNetStage, fn_constructor_kwargs={"checkpoint": speaker.talknet_checkpoint}, **actors)
    return ds.map(crop_row, fn_kwargs={"speaker": speaker, "storage_settings": storage_settings})


def _write(store: Store, rows: pa.Table | list[dict], report: PreprocessReport) -> None:
    result = store.write_utterances(rows)
    for rejection in result.rejected:
        report.failures[("store", rejection.reason)] += 1


def run_preprocess(config: MergConfig) -> PreprocessReport:
    """Run the preprocessing job described by `config.preprocess` into `config.paths.store`."""
    started = time.perf_counter()
    pc = config.preprocess
    meld_root = pc.meld_root or config.synth.out
    config.storage.apply()

    # read manifest
    readings = read_splits(meld_root, pc.splits)
    records = [r for reading in readings.values() for r in (reading.records[: pc.limit] if pc.limit else reading.records)]

    size = resolve_size(pc.imagebind_checkpoint, pc.imagebind_size)
    dim = SIZES[size].out_embed_dim
    weights = checkpoint_id(pc.imagebind_checkpoint, pc.seed)
    encoder = f"imagebind-{size}"
    config_hash = preprocess_config_hash(pc, encoder, weights)
    store = Store.open(config.paths.store, create=True, embedding_dim=dim, fused_dim=fused_width(pc.fusion, dim))
    report = PreprocessReport(
        store=config.paths.store, store_version=store.version, encoder=encoder,
        encoder_checkpoint=weights, fusion=pc.fusion, config_hash=config_hash, total=len(records),
    )  # fmt: skip
    provenance = dict(
        encoder=encoder, encoder_checkpoint=weights, fusion=pc.fusion, pipeline_version=PIPELINE_VERSION,
        config_hash=config_hash,
    )  # fmt: skip
    bad_rows = [(f"{split}/csv-line-{line}", "read", "bad_csv_row", why) for split, rd in readings.items() for line, why in rd.bad_rows]
    store.record_failures(bad_rows)
    report.failures.update(("read", "bad_csv_row") for _ in bad_rows)

    # plan: what is already done with the same clip and config is skipped
    media = [r for r in records if r.clip_path is not None and not pc.no_media]
    text_only = [r for r in records if r.clip_path is None or pc.no_media]
    sha = _hash_clips(media)
    done = {} if pc.force else {
        row["key"]: row for row in store.query(columns=["key", "clip_sha256", "config_hash", "created_at"]).to_pylist()
    }  # fmt: skip
    todo_text = [r for r in text_only if r.key not in done]
    todo_media = [r for r in media if not _unchanged(r, done.get(r.key), sha, config_hash)]
    report.skipped = len(records) - len(todo_text) - len(todo_media)
    meta = {r.key: _metadata_row(r, provenance) for r in todo_text + todo_media}
    failed_before = set(store.failures(columns=["key"]).column("key").to_pylist())

    # text-only rows: metadata now, a failure record for clips that should have been there
    text_batch = max(pc.write_batch, 2048)  # metadata rows are small: fewer, larger commits
    for i in range(0, len(todo_text), text_batch):
        _write(store, [meta[r.key] for r in todo_text[i : i + text_batch]], report)
    missing = [(r.key, "read", "missing_file", "CSV row without a clip") for r in todo_text if r.clip_status == "missing"]
    store.record_failures(missing)
    report.failures.update(("read", "missing_file") for _ in missing)
    report.text_only = len(todo_text)

    if todo_media:
        media_started = time.perf_counter()
        _run_media(config, store, todo_media, meta, failed_before, report)
        report.media_seconds = time.perf_counter() - media_started
    if pc.optimize and (todo_media or todo_text):
        report.upkeep = store.optimize(timedelta(days=config.store.retention_days))
    report.store_version = store.version
    report.seconds = time.perf_counter() - started
    return report


def _unchanged(record: Utterance, stored: dict | None, sha: dict[str, str | None], config_hash: str) -> bool:
    """Is the stored row of this clip current: the same config, and the same clip? On a local disk the
    clip's sha256 says; in object storage the clip's modification time, older than the row, so that
    planning reads no clip (its decode task hashes what it reads)."""
    if stored is None or stored["config_hash"] != config_hash:
        return False
    if storage.is_uri(record.clip_path):
        return bool(stored["clip_sha256"]) and record.clip_modified is not None and record.clip_modified < stored["created_at"]
    return stored["clip_sha256"] == sha.get(record.key)


def _run_media(
    config: MergConfig, store: Store, todo: list[Utterance], meta: dict, failed_before: set[str], report: PreprocessReport,
) -> None:
    import ray

    from infra.runtime import init_ray

    pc = config.preprocess
    init_ray(pc.ray_address, num_cpus=pc.num_cpus)
    settings = storage.settings().as_dict()  # the tasks that read clips and write fragments use the driver's
    items = [{"key": r.key, "path": str(r.clip_path)} for r in todo]
    ds = _speaker_crops(_decoded(items, pc, settings), pc, settings)
    ds = ds.map_batches(
        ImageBindStage,
        fn_constructor_kwargs=dict(
            checkpoint=str(pc.imagebind_checkpoint) if pc.imagebind_checkpoint else None,
            size=pc.imagebind_size, seed=pc.seed, dtype=pc.encoder_dtype,
        ),
        # A GPU actor needs no CPU slot; a CPU actor takes none either, so that decode tasks (the
        # heavy part on CPU) can use every core; the encoder's work interleaves with theirs.
        compute=ray.data.ActorPoolStrategy(size=pc.encoder_actors), num_gpus=pc.encoder_gpus, num_cpus=0,
        batch_size=pc.batch_size, batch_format="numpy",
    )  # fmt: skip
    # fuse + write (fused into one task) take no CPU slot: light work that must not wait behind the decode
    # tasks holding every CPU, or no row reaches the store before the last clip is decoded
    ds = ds.map_batches(fuse_batch, fn_kwargs={"mode": pc.fusion}, batch_format="numpy", num_cpus=0)
    ds = ds.map_batches(write_batch, **writer_arguments(store, pc.write_batch, meta, settings))
    committer = FragmentCommitter(
        store, pc.commit_interval_s, pc.commit_rows, on_commit=lambda batches: [_book(store, b, failed_before, report) for b in batches],
        compact_every=pc.compact_every, rewrite=_rewrite_in_tasks(settings),
    )  # fmt: skip
    commit_written(ds, committer, len(items))
    report.commits = committer.commits


# ---- the writer: workers write fragments, the driver commits them --------------------------------------
@dataclass
class WrittenBatch:
    """One writer task's result, sent to the driver: the fragment it wrote (metadata only) and what the
    driver books once that fragment is committed."""

    written: WrittenFragments
    keys: list[str]  # every key of the batch (rejected rows included)
    failed: list[tuple[str, str, str, str]]  # (key, stage, reason, detail) of the clips that failed a stage
    ok: list[str]  # keys whose clip went through every stage
    embedded: int  # rows with at least one embedding


def write_batch(
    batch: dict[str, np.ndarray], meta: dict, store_root: storage.Location, embedding_dim: int, fused_dim: int,
    storage_settings: dict | None = None,
) -> dict[str, np.ndarray]:
    """Last stage (CPU task): the batch's store rows, written as a Lance fragment by this worker; returns
    one row holding the pickled `WrittenBatch` (no embeddings go to the driver)."""
    storage.configure(storage_settings)
    keys = [str(k) for k in batch["key"]]
    failed = [(k, str(s), str(r), str(d)) for k, s, r, d in zip(keys, batch["fail_stage"], batch["fail_reason"], batch["fail_detail"]) if r]
    has_any = batch["has_audio_feat"].astype(bool) | batch["has_frames"].astype(bool)
    result = WrittenBatch(
        write_fragments(store_root, _media_rows(batch, meta), embedding_dim, fused_dim), keys, failed,
        [k for k, r in zip(keys, batch["fail_reason"]) if not r], int(has_any.sum()),
    )  # fmt: skip
    return {"written": np.array([pickle.dumps(result)], dtype=object)}


def writer_arguments(store: Store, rows: int, meta: dict, storage_settings: dict | None) -> dict:
    """`map_batches` arguments of the writer stage (`write_batch`): `rows` a fragment, no CPU slot."""
    return dict(
        batch_size=rows, batch_format="numpy", num_cpus=0,
        fn_kwargs=dict(meta=meta, store_root=store.root, embedding_dim=store.embedding_dim, fused_dim=store.fused_dim,
                       storage_settings=storage_settings),
    )  # fmt: skip


def commit_written(ds, committer: "FragmentCommitter", total: int) -> None:
    """Run the job (`ds` ends in the writer stage), committing what the writers wrote as it arrives."""
    with progress_bar("preprocessing clips", total) as advance:
        # no prefetching: each writer's result is taken as soon as it is there, not when the next one is
        for results in with_ticks(ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"), every=1.0):
            for written in results["written"] if results is not None else ():
                batch = pickle.loads(written)
                committer.add(batch)
                advance(len(batch.keys))
            committer.commit_if_due()
        committer.commit()


def _book(store: Store, batch: WrittenBatch, failed_before: set[str], report: PreprocessReport) -> None:
    """After a batch's fragment is committed: its rejected rows and failed clips go to `failures`, and
    clips that work now leave it."""
    for rejection in batch.written.rejected:
        report.failures[("store", rejection.reason)] += 1
    if batch.written.rejected:
        store.record_failures([(r.key, "store", r.reason, r.detail) for r in batch.written.rejected])
    store.record_failures(batch.failed)
    report.failures.update((s, r) for _, s, r, _ in batch.failed)
    report.embedded += batch.embedded
    fixed = [k for k in batch.ok if k in failed_before]
    store.clear_failures(fixed)  # a clip that works now no longer counts as failed


class FragmentCommitter:
    """The driver's side of the write: collects what writer tasks wrote and commits it with
    `Store.commit_fragments` every `interval_s` seconds (the first at once) or `max_rows` rows, then
    hands the committed batches to `on_commit` (failure bookkeeping). It knows which keys are stored (as
    of a version), so that a commit searches the store only for those; when another writer has
    committed in between it looks again. A key seen twice (a retried task whose first result also
    arrived) waits for the next commit, where it replaces the first. Every `compact_every` fragments it
    merges the small ones (`Store.compact_small_fragments`, rewritten by `rewrite`), so that the store
    stays fast to read while the job runs."""

    def __init__(self, store: Store, interval_s: float, max_rows: int, on_commit=None, compact_every: int | None = None,
                 rewrite=None):  # fmt: skip
        self.store, self.interval_s, self.max_rows = store, interval_s, max_rows
        self._know_stored()
        self.on_commit = on_commit or (lambda batches: None)
        self.compact_every, self.rewrite, self.uncompacted = compact_every, rewrite, 0
        self.pending: list[WrittenBatch] = []
        self.pending_keys: set[str] = set()
        self.last = float("-inf")
        self.commits = 0

    def add(self, batch: WrittenBatch) -> None:
        if self.pending_keys & set(batch.written.keys):
            self.commit()
        self.pending.append(batch)
        self.pending_keys.update(batch.written.keys)
        if len(self.pending_keys) >= self.max_rows:
            self.commit()

    def commit_if_due(self) -> None:
        if self.pending and time.monotonic() - self.last >= self.interval_s:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        batches, self.pending = self.pending, []
        keys, self.pending_keys = self.pending_keys, set()
        version = self.store.commit_fragments([b.written for b in batches], replace=keys & self.stored, as_of=self.as_of)
        self.stored |= keys
        self._moved_to(version)
        self.last = time.monotonic()
        self.commits += 1
        log.info("committed %d rows as store version %d", len(keys), version)
        self.on_commit(batches)
        self.uncompacted += sum(len(b.written.fragments) for b in batches)
        if self.compact_every and self.uncompacted >= self.compact_every:
            self.uncompacted = 0
            if self.store.compact_small_fragments(rewrite=self.rewrite):
                self._moved_to(self.store.version)  # the same rows: only the version moved

    def _moved_to(self, version: int) -> None:
        """After this process's own commit: if nobody else committed in between, what is stored is known still."""
        if version == self.as_of + 1:
            self.as_of = version
        else:
            self._know_stored()

    def _know_stored(self) -> None:
        dataset = self.store.lance_dataset()
        self.as_of, self.stored = dataset.version, set(dataset.to_table(columns=["key"]).column("key").to_pylist())


def _rewrite_in_tasks(storage_settings: dict | None):
    """Compaction tasks run as Ray tasks (no CPU slot: they must not wait behind the decode tasks), so
    that the rows they rewrite never pass through the driver."""

    def rewrite(tasks: list, root: storage.Location) -> list:
        import ray

        remote = ray.remote(num_cpus=0)(_execute_compaction)
        return ray.get([remote.remote(task, root, storage_settings) for task in tasks])

    return rewrite


def _execute_compaction(task, root: storage.Location, storage_settings: dict | None):
    storage.configure(storage_settings)
    return task.execute(Store.open(root).lance_dataset())


def with_ticks(items: Iterable, every: float) -> Iterator:
    """The items of `items` (iterated in a thread), with a None whenever `every` seconds pass without one:
    the caller can act on time (commit) while the stream is slow."""
    channel: queue.Queue = queue.Queue(maxsize=256)
    done = object()

    def pump() -> None:
        try:
            for item in items:
                channel.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            channel.put(exc)
        channel.put(done)

    threading.Thread(target=pump, name="merg-results", daemon=True).start()
    while True:
        try:
            item = channel.get(timeout=every)
        except queue.Empty:
            yield None
            continue
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
