from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from featurestore import Store
from featurestore.store import StoreNotFound
from infra.config import load_config
from pipelines.asd.sync import DEFAULT_THRESHOLD
from pipelines.job import run_preprocess
from pipelines.meld import read_splits
from pipelines.synth import read_ground_truth
from pipelines.synth.faults import EXPECTED


def _config(mini_meld, store, *more):
    return load_config(None, [f"preprocess.meld_root={mini_meld}", f"paths.store={store}", "preprocess.batch_size=4", *more])


@pytest.mark.slow
def test_job_writes_every_utterance_once_and_every_fault(mini_meld, tmp_path, ray_session):
    truth = read_ground_truth(mini_meld)
    report = run_preprocess(_config(mini_meld, tmp_path / "store"))
    store = Store.open(tmp_path / "store")
    rows = {r["key"]: r for r in store.query().to_pylist()}
    assert set(rows) == set(truth) and report.total == len(truth)
    failures = {(f["key"], f["reason"]) for f in store.failures().to_pylist()}
    for key, t in truth.items():
        expected = EXPECTED.get(t["fault"]) if t["fault"] else None
        if expected in (None, "text_repaired"):
            assert rows[key]["fused_emb"] is not None and rows[key]["audio_emb"] is not None, key
            assert not any(k == key for k, _ in failures)
        elif t["fault"] == "no_audio":
            assert rows[key]["vision_emb"] is not None and rows[key]["audio_emb"] is None
            assert rows[key]["fused_emb"] is not None and (key, "no_audio_stream") in failures
            # no speech to score with: the longest face track is embedded, speaking unknown
            assert rows[key]["asd_method"] == "largest_track" and rows[key]["face_visible"] is None
        else:
            assert rows[key]["fused_emb"] is None
            assert (key, "missing_file" if expected == "missing" else expected) in failures
    row = next(r for r in rows.values() if r["fused_emb"] is not None)
    assert row["encoder_checkpoint"] == "random-init:0" and row["fusion"] == "mean_l2"
    visible = store.query(face_visible=True, columns=["key", "asd_method", "asd_score", "speaker_box"]).to_pylist()
    assert len(visible) >= 0.8 * sum(EXPECTED.get(t["fault"]) in (None, "text_repaired") for t in truth.values())
    assert all(v["asd_method"] == "sync" and v["asd_score"] >= DEFAULT_THRESHOLD and v["speaker_box"] for v in visible)
    assert len(row["fused_emb"]) == store.fused_dim == 128

    again = run_preprocess(_config(mini_meld, tmp_path / "store"))
    assert again.skipped == len(truth) and again.embedded == 0
    assert Store.open(tmp_path / "store").query(columns=["key"]).num_rows == len(truth)

    other = run_preprocess(_config(mini_meld, tmp_path / "store", "preprocess.fusion=sum_raw", "preprocess.splits=[dev]"))
    assert other.skipped == sum(t["split"] == "dev" and t["clip"] and t["fault"] == "missing_clip" for t in truth.values())
    # the recomputed keys replaced their rows: each key once, the dev clips' rows from the new config
    rows = Store.open(tmp_path / "store").query(columns=["key", "fusion", "clip_sha256"]).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(truth)
    assert {r["fusion"] for r in rows if r["key"].startswith("dev/") and r["clip_sha256"]} == {"sum_raw"}
    assert report.commits >= 2 and report.upkeep.fragments_after <= 4  # rows streamed in; upkeep compacted them


@pytest.mark.meld_text
def test_no_media_ingests_all_real_meld_text(meld_text_dir, tmp_path):
    report = run_preprocess(load_config(None, [f"preprocess.meld_root={meld_text_dir}", f"paths.store={tmp_path}/s", "preprocess.no_media=true"]))
    assert report.text_only == report.total == 13_708
    stats = Store.open(tmp_path / "s").stats()
    assert {s: sum(c.values()) for s, c in stats.by_split_emotion.items()} == {"train": 9989, "dev": 1109, "test": 2610}
    assert stats.with_embeddings["fused_emb"] == 0 and not stats.failures


def _committed_clips(store_dir) -> int:
    try:
        return Store.open(store_dir).query(where="clip_sha256 IS NOT NULL", columns=["key"]).num_rows
    except StoreNotFound:  # the first commit has not happened yet
        return 0


@pytest.mark.slow
def test_rows_stream_into_the_store_and_a_kill_at_half_keeps_them(mini_meld, tmp_path):
    """Commits stream (issue 27): while the job runs, its rows reach the store; a SIGKILL of the job's
    process group once half of its clips are committed loses none of them, and the re-run stores every key
    exactly once, including the clips whose fragments were written but not committed when the job died."""
    store_dir = tmp_path / "store"
    truth = read_ground_truth(mini_meld)
    clips = sum(1 for t in truth.values() if t["clip"] and t["fault"] != "missing_clip")
    cmd = [sys.executable, "-m", "infra.cli", "preprocess", "--meld-root", str(mini_meld), "--store", str(store_dir),
           "--batch-size", "2", "--set", "preprocess.write_batch=2", "--set", "preprocess.num_cpus=2",
           "--set", "preprocess.commit_interval_s=2", "--set", "preprocess.optimize=false"]  # fmt: skip
    job = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, committed = time.time() + 300, 0
    while time.time() < deadline and job.poll() is None and committed < clips / 2:
        time.sleep(0.5)
        committed = _committed_clips(store_dir)  # a reader beside the writer sees its latest commit
    assert job.poll() is None, "the job finished before it could be killed; make the input larger"
    assert committed >= clips / 2, f"only {committed} of {clips} clips committed in 300 s"
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    job.wait()
    assert _committed_clips(store_dir) >= committed

    truth = read_ground_truth(mini_meld)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    store = Store.open(store_dir)
    keys = store.query(columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == len(truth)
    good = [k for k, t in truth.items() if t["fault"] in (None, "mojibake_cp1252", "mojibake_double", "quotes_commas_newline")]
    with_vectors = set(store.query(where="fused_emb IS NOT NULL", columns=["key"]).column("key").to_pylist())
    assert set(good) <= with_vectors


def test_encoder_stage_isolates_a_bad_input():
    """One input the model cannot take fails alone (recorded), the rest of its batch is embedded."""
    import numpy as np

    from pipelines.job import ImageBindStage

    frames = np.empty(2, dtype=object)
    frames[0], frames[1] = np.zeros((5, 2, 224, 224, 3), np.uint8), np.zeros((5, 2, 224, 224, 4), np.uint8)  # 4 channels (any size is resized now)
    empty = lambda: np.array(["", ""], dtype=object)  # noqa: E731
    batch = {
        "key": np.array(["test/dia0_utt0", "test/dia0_utt1"], dtype=object), "has_audio_feat": np.array([True, False]),
        "has_frames": np.array([True, True]), "audio_feat": np.zeros((2, 3, 1, 128, 204), np.float32), "frames": frames,
        "fail_stage": empty(), "fail_reason": empty(), "fail_detail": empty(),
    }  # fmt: skip
    out = ImageBindStage(checkpoint=None, size=None, seed=0)(batch)
    assert out["has_frames"].tolist() == [True, False]
    assert out["fail_reason"].tolist() == ["", "encode_error"] and out["fail_stage"][1] == "encode"
    assert np.linalg.norm(out["vision_raw"][0]) == pytest.approx(1, abs=1e-3) and not out["vision_raw"][1].any()
    assert np.linalg.norm(out["audio_raw"][0]) == pytest.approx(20, rel=1e-2)


def test_a_long_1080p_clip_requests_more_decode_memory_than_short_ones(mini_meld, tmp_path):
    """Decode memory follows the clip (frames read x pixels), not one fixed figure for every clip."""
    from pipelines.decode import DECODE_BASE_MEMORY
    from pipelines.job import decode_memory_request

    long_clip = tmp_path / "long_1080p.mp4"  # 20 s of 1080p; 1 fps keeps it cheap: the speaker stage reads 25 fps anyway
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=1920x1080:rate=1:duration=20", "-c:v", "libx264", "-preset", "ultrafast", "-an",
                    str(long_clip)], check=True, timeout=120)  # fmt: skip
    truth = read_ground_truth(mini_meld)
    short = [mini_meld / t["clip"] for t in truth.values() if t["fault"] is None]
    short_requests = [decode_memory_request(str(p)) for p in short]
    assert short_requests and max(short_requests) <= 2 * 1024**3
    assert decode_memory_request(str(long_clip)) >= 3 * 1024**3 > max(short_requests)
    assert decode_memory_request(str(tmp_path / "gone.mp4")) == DECODE_BASE_MEMORY  # fails fast, at the base


@pytest.mark.slow
def test_odd_clip_paths_become_failures_and_the_job_goes_on(mini_meld, tmp_path, ray_session, monkeypatch):
    """A directory, a dangling and a looping link, a FIFO and a clip deleted between planning and
    decoding: each is a row and a failure with its reason; the good clip is embedded; a re-run adds nothing."""
    import csv
    import shutil

    from pipelines import job
    from pipelines.meld import CSV_COLUMNS, CSV_NAMES, read_split

    truth = read_ground_truth(mini_meld)
    good = next(mini_meld / t["clip"] for t in truth.values() if t["split"] == "dev" and t["fault"] is None and t["clip"])
    root, clips = tmp_path / "meld", tmp_path / "meld" / "dev_splits_complete"
    clips.mkdir(parents=True)
    with (root / CSV_NAMES["dev"]).open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows([CSV_COLUMNS] + [
            [i + 1, f"Line {i}.", "Joey", "neutral", "neutral", 0, i, 1, 1, "00:00:01,000", "00:00:02,000"] for i in range(6)
        ])  # fmt: skip
    records = read_split(root, "dev").records
    paths = [clips / f"dia{r.dialogue_id}_utt{r.utterance_id}.mp4" for r in records]
    shutil.copy(good, paths[0])
    paths[1].mkdir()
    paths[2].symlink_to(clips / "nowhere.mp4")
    paths[3].symlink_to(paths[3])
    os.mkfifo(paths[4])
    shutil.copy(good, paths[5])
    expected = {records[1].key: "is_directory", records[2].key: "dangling_link", records[3].key: "link_loop",
                records[4].key: "not_regular_file", records[5].key: "missing_file"}  # fmt: skip

    hash_clips = job._hash_clips

    def hash_then_delete(todo):  # the last clip vanishes after planning, before its decode task runs
        hashes = hash_clips(todo)
        paths[5].unlink()
        return hashes

    monkeypatch.setattr(job, "_hash_clips", hash_then_delete)
    config = _config(root, tmp_path / "store", "preprocess.splits=[dev]")
    report = run_preprocess(config)
    store = Store.open(tmp_path / "store")
    keys = store.query(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(r.key for r in records) and report.total == 6
    assert {f["key"]: f["reason"] for f in store.failures().to_pylist()} == expected
    assert store.vector_of(records[0].key) is not None

    monkeypatch.setattr(job, "_hash_clips", hash_clips)
    again = run_preprocess(config)
    assert again.skipped == 6 and Store.open(tmp_path / "store").query(columns=["key"]).num_rows == 6


def test_encoder_dtype_enters_the_config_hash_only_when_not_fp32():
    """A store written before `preprocess.encoder_dtype` existed keeps its hashes (no recompute); a
    bf16 encoder's rows are recomputed."""
    from pipelines.job import preprocess_config_hash

    default, fp32 = load_config(None, []).preprocess, load_config(None, ["preprocess.encoder_dtype=float32"]).preprocess
    bf16 = load_config(None, ["preprocess.encoder_dtype=bfloat16"]).preprocess
    hashes = [preprocess_config_hash(pc, "imagebind-small", "random-init:0") for pc in (default, fp32, bf16)]
    assert hashes[0] == hashes[1] != hashes[2]


def _stage_names(ds) -> list[str]:
    op, names = ds._logical_plan.dag, []
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return names[::-1]


def test_speaker_models_run_as_actor_stages_only_when_given(ray_session, tmp_path):
    """S3FD and TalkNet are actor pools between the CPU stages (a GPU share each with asd_gpus), not
    models inside every decode task; without their checkpoints the stage is CPU only."""
    import ray

    from pipelines.job import _speaker_crops

    items = ray.data.from_items([{"key": "dev/dia0_utt0", "path": "clip.mp4"}])
    plain = load_config(None, []).preprocess
    assert _stage_names(_speaker_crops(items, plain)) == ["FromItems", "Map(crop_row)"]  # decode tracks Haar's faces
    models = load_config(None, [
        "preprocess.asd_method=talknet", f"preprocess.talknet_checkpoint={tmp_path}/t.model",
        f"preprocess.s3fd_checkpoint={tmp_path}/s.pth", "preprocess.asd_gpus=0.5", "preprocess.asd_actors=2",
    ]).preprocess  # fmt: skip
    ds = _speaker_crops(items, models)
    names = _stage_names(ds)
    assert names == ["FromItems", "MapBatches(S3FDStage)", "Map(track_row)", "MapBatches(TalkNetStage)", "Map(crop_row)"]
    op = ds._logical_plan.dag.input_dependencies[0]  # TalkNetStage
    assert op.ray_remote_args["num_gpus"] == 0.5 and op.compute.max_size == 2 and op.batch_size == 4
    # by default CPU actors take a clip a call and scale from one to every CPU (S3FD is most of the work
    # there); on GPUs one actor per model takes 4 clips a call
    cpu = load_config(None, [f"preprocess.s3fd_checkpoint={tmp_path}/s.pth"]).preprocess
    op = _speaker_crops(items, cpu)._logical_plan.dag.input_dependencies[0].input_dependencies[0]  # S3FDStage
    assert (op.compute.min_size, op.compute.max_size, op.batch_size) == (1, int(ray.cluster_resources()["CPU"]), 1)
    gpu = load_config(None, [f"preprocess.s3fd_checkpoint={tmp_path}/s.pth", "preprocess.asd_gpus=1"]).preprocess
    op = _speaker_crops(items, gpu)._logical_plan.dag.input_dependencies[0].input_dependencies[0]
    assert (op.compute.min_size, op.compute.max_size, op.batch_size) == (1, 1, 4)


@pytest.mark.slow  # TalkNet's six window lengths on CPU
def test_job_scores_speakers_in_a_talknet_actor_stage(mini_meld, tmp_path, ray_session):
    """With a TalkNet checkpoint (random: the path is tested, not the choice) the job's TalkNet actors
    score the tracks; every clip still ends as one row, the faults as failures."""
    import torch

    from pipelines.asd.talknet import TalkNet

    torch.save(TalkNet().state_dict(), tmp_path / "pretrain_TalkSet.model")
    config = _config(mini_meld, tmp_path / "store", "preprocess.splits=[dev]", "preprocess.limit=4",
                     "preprocess.asd_method=talknet", f"preprocess.talknet_checkpoint={tmp_path}/pretrain_TalkSet.model")  # fmt: skip
    report = run_preprocess(config)
    rows = Store.open(tmp_path / "store").query(columns=["key", "asd_method", "vision_emb"]).to_pylist()
    assert len(rows) == report.total == 4
    assert "talknet" in {r["asd_method"] for r in rows}
    assert not {reason for stage, reason in report.failures if stage == "speaker"}


def write_meld(root, split: str, labels: list[tuple[str, str]], clip=None) -> list:
    """A one-dialogue MELD root: a CSV row per (emotion, sentiment), each row a copy of `clip` (if given)."""
    import csv
    import shutil

    from pipelines.meld import CLIP_DIRS, CSV_COLUMNS, CSV_NAMES, read_split

    root.mkdir(parents=True, exist_ok=True)
    with (root / CSV_NAMES[split]).open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows([CSV_COLUMNS] + [
            [i + 1, f"Line {i}.", "Joey", emotion, sentiment, 0, i, 1, 1, "00:00:01,000", "00:00:02,000"]
            for i, (emotion, sentiment) in enumerate(labels)
        ])  # fmt: skip
    if clip is not None:
        (root / CLIP_DIRS[split]).mkdir(exist_ok=True)
        for i in range(len(labels)):
            shutil.copy(clip, root / CLIP_DIRS[split] / f"dia0_utt{i}.mp4")
    return read_split(root, split).records


def _where_is(store_dir, key: str) -> tuple[bool, set[str]]:
    """(stored?, the failure reasons recorded) for `key`."""
    store = Store.open(store_dir)
    return key in store.keys(), {f["reason"] for f in store.failures().to_pylist() if f["key"] == key}


def test_a_bad_label_stays_failed_on_every_text_only_rerun_and_is_forgotten_once_fixed(tmp_path):
    """issue 27 item 1 (text rows): a label outside MELD's is `store/unknown_emotion` run after run, the
    summary counts only rows really written, and once the CSV is corrected the key is stored and its
    failure record gone."""
    root, store = tmp_path / "meld", tmp_path / "store"
    bad, good = (r.key for r in write_meld(root, "dev", [("happy", "positive"), ("joy", "positive")]))
    config = _config(root, store, "preprocess.splits=[dev]", "preprocess.no_media=true")
    for run in range(3):
        report = run_preprocess(config)
        assert report.text_only == (1 if run == 0 else 0), run  # the rejected row is not "written"
        assert report.failures == {("store", "unknown_emotion"): 1}
        assert _where_is(store, bad) == (False, {"unknown_emotion"}) and _where_is(store, good) == (True, set())
    write_meld(root, "dev", [("joy", "positive"), ("joy", "positive")])
    assert run_preprocess(config).text_only == 1
    assert _where_is(store, bad) == (True, set())


@pytest.mark.slow
def test_a_bad_label_with_a_clip_stays_failed_on_every_rerun(mini_meld, tmp_path, ray_session):
    """issue 27 item 1 (media rows): runs 1, 2 and 3 each leave the bad-label key failed with its reason
    (a re-run used to delete the record, the third restore it) and count as embedded only the row stored."""
    truth = read_ground_truth(mini_meld)
    clip = next(mini_meld / t["clip"] for t in truth.values() if t["fault"] is None and t["clip"])
    root, store = tmp_path / "meld", tmp_path / "store"
    bad, good = (r.key for r in write_meld(root, "dev", [("ecstatic", "positive"), ("joy", "positive")], clip))
    config = _config(root, store, "preprocess.splits=[dev]")
    for run in range(3):
        report = run_preprocess(config)
        assert report.embedded == (1 if run == 0 else 0), run
        assert report.failures == {("store", "unknown_emotion"): 1}, run
        assert _where_is(store, bad) == (False, {"unknown_emotion"}), run
        assert _where_is(store, good) == (True, set())


def test_a_clip_linked_out_of_the_meld_root_is_refused_unread(mini_meld, tmp_path):
    """issue 27 item 4: a clip that is a link leading out of the MELD root (here to a private file) is
    refused as `outside_root` before anything reads it, and none of its bytes reach the store; a link
    within the root is followed."""
    from pipelines.meld import read_splits, summarize

    truth = read_ground_truth(mini_meld)
    clip = next(mini_meld / t["clip"] for t in truth.values() if t["fault"] is None and t["clip"])
    secret = tmp_path / "elsewhere" / "hostname"
    secret.parent.mkdir()
    secret.write_bytes(b"vm\nsecret-host\n")
    root, store = tmp_path / "meld", tmp_path / "store"
    out, inside = write_meld(root, "dev", [("joy", "positive"), ("joy", "positive")], clip)
    out_path, inside_path = root / "dev_splits_complete" / "dia0_utt0.mp4", root / "dev_splits_complete" / "dia0_utt1.mp4"
    out_path.unlink()
    out_path.symlink_to(secret)
    (root / "kept.mp4").write_bytes(inside_path.read_bytes())
    inside_path.unlink()
    inside_path.symlink_to(root / "kept.mp4")

    records = {r.key: r for r in read_splits(root, ["dev"])["dev"].records}
    assert records[out.key].clip_status == "outside_root" and records[out.key].clip_path is None
    assert records[inside.key].clip_status == "found"
    assert ("outside_root" in {reason for _, reason, _ in summarize(read_splits(root, ["dev"]), probe=False).problems})

    report = run_preprocess(_config(root, store, "preprocess.splits=[dev]", "preprocess.no_media=true"))
    assert report.failures == {("read", "outside_root"): 1}
    (failure,) = Store.open(store).failures().to_pylist()
    assert failure["key"] == out.key and failure["reason"] == "outside_root" and "outside the MELD root" in failure["detail"]
    assert "secret-host" not in failure["detail"] and "vm\\n" not in failure["detail"]
    assert Store.open(store).keys() == {out.key, inside.key}  # the row itself is kept, text only


def _fused_rows(n: int, dim: int) -> tuple[list[dict], dict]:
    """Rows as the fuse stage hands them to the writer (no decoding: the writer is the point), and their metadata."""
    import numpy as np

    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = [f"train/dia{i}_utt0" for i in range(n)]
    rows = [dict(key=k, duration=np.float32(1.5), fps=np.float32(25), has_audio_stream=True, has_audio_feat=True, has_frames=True,
                 face_visible=1, speaker_box=np.zeros(4, np.float32), asd_method="sync", asd_score=np.float32(0.9), track_frames=30,
                 audio_emb=v, vision_emb=v, fused_emb=v, fail_stage="", fail_reason="", fail_detail="", clip_sha256=f"{i:064x}")
            for i, (k, v) in enumerate(zip(keys, vectors))]  # fmt: skip
    meta = {k: dict(key=k, split="train", dialogue_id=i, utterance_id=0, speaker="Joey", text=f"Line {i}.", emotion="joy",
                    sentiment="positive") for i, k in enumerate(keys)}  # fmt: skip
    return rows, meta


def test_a_writer_task_that_dies_after_writing_its_fragment_is_retried_and_its_rows_stored_once(ray_session, tmp_path):
    """A retried task: the writer's worker dies after its fragment is written, before its result reaches
    the driver; Ray runs the task again, and only the retry's fragment is committed (the first one's
    files stay unreferenced)."""
    import ray

    from pipelines import job

    store = Store.open(tmp_path / "store", create=True, embedding_dim=16)
    rows, meta = _fused_rows(12, 16)
    died = tmp_path / "died"

    def dies_once_after_writing(batch, **kwargs):
        out = job.write_batch(batch, **kwargs)
        if str(batch["key"][0]) == "train/dia4_utt0" and not died.exists():
            died.touch()
            os._exit(1)  # the worker process dies: a system failure, which Ray retries
        return out

    ds = ray.data.from_items(rows, override_num_blocks=3).map_batches(dies_once_after_writing, **job.writer_arguments(store, 4, meta, None))
    committer = job.FragmentCommitter(store, interval_s=0.0, max_rows=1000)
    job.commit_written(ds, committer, len(rows))
    keys = Store.open(tmp_path / "store").query(columns=["key"]).column("key").to_pylist()
    assert died.exists() and sorted(keys) == sorted(meta) and len(keys) == 12
    data_files = list((tmp_path / "store" / "utterances.lance" / "data").glob("*.lance"))
    assert len(data_files) == 4 and committer.commits == 3  # three fragments committed, one orphan


@pytest.mark.slow
def test_the_job_reads_meld_from_s3_and_writes_its_store_there(mini_meld, s3, ray_session):
    """MELD and the store on the S3 server: decode tasks read their clips from it, writers write the
    store's fragments to it. A re-run recomputes nothing; a clip uploaded again is recomputed and its row
    replaced, each key still once."""
    from featurestore import storage

    from pipelines.meld import summarize

    storage.upload_tree(mini_meld, f"{s3}/MELD.Raw")
    local, remote = summarize(read_splits(mini_meld, ["dev"])), summarize(read_splits(f"{s3}/MELD.Raw", ["dev"]))
    assert remote.clips == local.clips and [p[:2] for p in remote.problems] == [p[:2] for p in local.problems]
    config = load_config(None, [f"preprocess.meld_root={s3}/MELD.Raw", f"paths.store={s3}/store", "preprocess.batch_size=4",
                                "preprocess.splits=[dev]", "preprocess.limit=4", "preprocess.commit_interval_s=1"])  # fmt: skip
    report = run_preprocess(config)
    truth = read_ground_truth(mini_meld)
    store = Store.open(f"{s3}/store")
    rows = {r["key"]: r for r in store.query(columns=["key", "clip_path", "clip_sha256", "fused_emb", "created_at"]).to_pylist()}
    assert len(rows) == report.total == 4 and report.upkeep.fragments_after == 1
    good = [k for k in rows if truth[k]["fault"] is None]
    assert good and all(rows[k]["fused_emb"] is not None and rows[k]["clip_path"].startswith(f"{s3}/MELD.Raw/") for k in good)
    from pipelines.imagebind import file_sha256

    assert rows[good[0]]["clip_sha256"] == file_sha256(mini_meld / truth[good[0]]["clip"])  # hashed by its decode task
    failed = {f["key"] for f in store.failures().to_pylist()}
    assert all(k in failed for k in rows if truth[k]["fault"] not in (None, "mojibake_cp1252", "mojibake_double", "quotes_commas_newline"))

    assert run_preprocess(config).skipped == 4
    clip = rows[good[0]]["clip_path"]
    storage.write_bytes(clip, storage.read_bytes(clip))  # uploaded again: newer than its row
    again = run_preprocess(config)
    assert again.skipped == 3 and again.embedded == 1
    after = {r["key"]: r for r in Store.open(f"{s3}/store").query(columns=["key", "created_at"]).to_pylist()}
    assert sorted(after) == sorted(rows) and after[good[0]]["created_at"] > rows[good[0]]["created_at"]
