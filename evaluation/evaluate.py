"""One evaluation cell: a system x a decoding preset x a split, on the same pairs for every system.

    result = evaluate_cell(Cell(sweep, system, preset, split), config)

Steps: load the pairs (targets of `evaluate.target` with the utterance embeddings the system needs);
if any is not yet stored for this cell, load the system (a trained run, or a pretrained model for
text-only) and split the pairs into batches of similar prompt length (a fixed partition: the same
batches on every attempt); for each batch not stored: generate the replies (`evaluate.backend`: HF
`generate` in this process, or vLLM in its own environment), score the gold replies teacher-forced,
score every reply's metrics. Every `evaluate.chunk_size` examples, and on SIGTERM/SIGINT, the finished
rows go to the store's `eval_outputs`, so a killed cell resumes at its first missing batch and redoes
at most one chunk. Once every example is stored, the aggregates (`evaluation.metrics`, each with a
bootstrap 95% interval) are computed from the stored rows alone. Both definitions are computed: the
standard ones (reply vs reference) and the reference system's (reply vs dialogue history;
self/unconditioned perplexities), labelled. How far a cell is goes to `cell_progress`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from evaluation.generate import PRESETS, Pair, first_sentence, generate_and_score, generation_prompt, score_without_context
from evaluation.metrics import bootstrap_ci, distinct_n, perplexity, sentiment_alignment, vader_compound
from evaluation.metrics.bertscore import BertScorer
from evaluation.metrics.copying import COPY_THRESHOLD, copy_statistics
from evaluation.metrics.distinct import TOKENIZER, reply_distinct_n
from evaluation.metrics.emotion import emotion_alignment, load_emotion_backend
from featurestore.schema import CELL_PROGRESS, EMOTIONS, EVAL_OUTPUTS
from featurestore.store import Store, build_filter
from infra.config import EvaluateConfig, MergConfig, SystemSpec
from infra.models import embedded_llm_dir, resolve_llm

log = logging.getLogger(__name__)

# bumped when a metric's definition changes, so stored cells computed the old way are not reused
# (3: perplexity scores the gold reply + the template's end of turn, as training does, not + EOS)
METRICS_VERSION = 3
COLUMNS = {"text": None, "audio": "audio_emb", "video": "vision_emb", "audio+video": "fused_emb"}


@dataclass(frozen=True)
class Cell:
    sweep: str
    system: SystemSpec
    preset: str
    split: str

    def id(self, config: EvaluateConfig, inputs: CellInputs) -> str:
        """Hash of everything that determines this cell's numbers (a cell stored as done with the same id is
        reused, by any sweep): the system and its weights (a run's whole adapter and its base model's
        weights), the decoding preset's parameters (not its name), the backend, split, the settings, the
        targets' content and the resolved metric backends with their weights. Not the sweep's name."""
        settings = config.model_dump(mode="json", include={"target", "limit", "system_prompt", "max_length", "batch_size",
                                                          "bootstrap_samples", "seed", "backend"})  # fmt: skip
        if config.backend == "vllm":  # continuous batching: which requests share a step is the chunk's
            settings["chunk_size"] = config.chunk_size
        blob = json.dumps([self.system.model_dump(mode="json"), asdict(PRESETS[self.preset]), self.split, settings,
                           inputs.runs.get(str(self.system.run)) if self.system.run else None,
                           inputs.targets.get(self.split), inputs.emotion_backend, inputs.bertscore,
                           inputs.pretrained.get(self.system.model) if self.system.run is None else None,
                           METRICS_VERSION], sort_keys=True)  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CellInputs:
    """What a cell's numbers depend on outside its own settings, resolved once per sweep."""

    targets: dict[str, str]  # split -> digest of the pairs' content (the first `limit` targets)
    emotion_backend: str  # the resolved backend ("lexicon", "meld", a folder) and its weights' digest
    bertscore: str  # the BERTScore model, its layer setting and its weights' digest
    pretrained: dict[str, str | None]  # a pretrained system's model -> its weights' digest
    runs: dict[str, str | None] = field(default_factory=dict)  # a trained run's folder -> `run_fingerprint`


def resolve_inputs(config: MergConfig, store: Store, splits: list[str] | None = None) -> CellInputs:
    from evaluation.metrics.emotion import emotion_backend_folder, resolve_emotion_backend
    from infra.models import resolve_bertscore_model

    ec, cache = config.evaluate, config.paths.model_cache
    targets = {}
    for split in splits or ec.splits:
        rows = store.targets(ec.target, split=split, columns=["key", "history", "next_speaker", "target", "next_emotion", "source"])
        rows = rows.slice(0, ec.limit) if ec.limit else rows
        targets[split] = hashlib.sha256(json.dumps(rows.to_pylist(), sort_keys=True).encode()).hexdigest()[:16]
    backend = resolve_emotion_backend(ec.emotion_backend, cache)
    folder = emotion_backend_folder(backend, cache)
    bert = resolve_bertscore_model(ec.bertscore_model) if ec.bertscore_model else resolve_bertscore_model()
    pretrained, runs = {}, {}
    for system in ec.systems:
        if system.run is not None:
            runs[str(system.run)] = run_fingerprint(system.run, cache)
        elif system.model not in pretrained:
            try:
                pretrained[system.model] = weights_digest(resolve_llm(system.model, cache))
            except Exception:  # a missing model fails its cell with the reason, not the plan
                pretrained[system.model] = None
    return CellInputs(
        targets=targets, emotion_backend=f"{backend}:{weights_digest(folder) if folder else ''}",
        bertscore=f"{Path(bert).name}:{ec.bertscore_layers}:{weights_digest(bert)}", pretrained=pretrained, runs=runs,
    )  # fmt: skip


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".jinja")
_digests: dict[tuple[str, int, int], str] = {}


def digest_cache_file() -> Path:
    """Where file digests are kept between processes: $MERG_DIGEST_CACHE, else ~/.cache/merg/digests.json."""
    if env := os.environ.get("MERG_DIGEST_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "merg" / "digests.json"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime) in this process and in `digest_cache_file()`,
    so a 16 GB checkpoint is read once, not once per plan or per cell."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _digests:
        return _digests[key]
    cache_file = digest_cache_file()
    try:
        stored = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        stored = {}
    entry = stored.get(key[0])
    if entry and entry[:2] == [key[1], key[2]]:
        _digests[key] = entry[2]
        return entry[2]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    _digests[key] = digest.hexdigest()
    stored[key[0]] = [key[1], key[2], _digests[key]]
    try:  # a lost race with another process only costs that process a re-read later
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.part")
        staging.write_text(json.dumps(stored))
        staging.replace(cache_file)
    except OSError as exc:
        log.debug("digest cache %s not written: %s", cache_file, exc)
    return _digests[key]


def weights_digest(folder: Path | str, suffixes: tuple[str, ...] | None = _WEIGHT_FILES) -> str | None:
    """Digest of a model folder's weights, configs and tokenizer files (every file with `suffixes`, or
    every file when None), or of one file; each file's bytes whole, through `file_digest`'s cache."""
    folder = Path(folder)
    if not folder.exists():
        return None
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file() and (suffixes is None or p.suffix in suffixes))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder) if path != folder else path.name}:{file_digest(path)}".encode())
    return digest.hexdigest()[:16]


def run_fingerprint(run: Path, model_cache: Path | None = None) -> str | None:
    """A trained run's identity: its base model's weights digest, its prompt settings and every file of
    its adapter (config and weights), projector and tokenizer (so a retrained or re-configured run is
    evaluated again, and a resumed, unchanged one is not)."""
    from training.mllm import ADAPTER_DIR, PROJECTOR_FILE, TOKENIZER_DIR

    run = Path(run)
    if not (run / "run.json").is_file():
        return None
    info = json.loads((run / "run.json").read_text())
    try:
        base = weights_digest(resolve_llm(info.get("model") or "", model_cache or Path(".")))
    except Exception:  # a missing base model fails the cell with the reason, not the plan
        base = None
    settings = [info.get(k) for k in ("model", "modality", "soft_tokens", "system_prompt", "max_length", "quantization", "projector")]
    parts = [weights_digest(run / part, None) for part in (ADAPTER_DIR, PROJECTOR_FILE, TOKENIZER_DIR)]
    return hashlib.sha256(json.dumps([settings, base, parts]).encode()).hexdigest()[:16]


class Scorers:
    """The metric models (BERTScore encoder, emotion classifier), loaded once per process."""

    def __init__(self, config: EvaluateConfig, model_cache: Path):
        self.bertscore = BertScorer(config.bertscore_model, config.bertscore_layers)
        self.emotion = load_emotion_backend(config.emotion_backend, model_cache)


@dataclass
class SystemInfo:
    """What a system is, read without loading its weights."""

    model_path: str  # the base model folder
    modality: str
    soft_tokens: int
    system_prompt: str | None  # a run's own; None: the evaluation's
    notes: list[str]


def describe_system(spec: SystemSpec, model_cache: Path) -> SystemInfo:
    from training.mllm import RunInfo

    if spec.run is not None:
        info = RunInfo.load(spec.run)
        system = SystemInfo(info.model, info.modality, info.soft_tokens, info.system_prompt, [])
    else:
        if spec.modality != "text":
            raise ValueError(f"system {spec.name!r}: a pretrained model has no projector; {spec.modality} needs a trained run")
        system = SystemInfo(str(resolve_llm(spec.model, model_cache)), "text", 0, None, [])
    if Path(system.model_path).resolve() == embedded_llm_dir(model_cache).resolve():
        system.notes.append("LLM: embedded SmolLM2-135M-Instruct (a small stand-in for 7-8B models)")
    return system


def load_system(spec: SystemSpec, model_cache: Path, device: torch.device):
    """(model, tokenizer, model path, modality, soft_tokens, system_prompt or None, notes) of a run or a pretrained model."""
    from training import load_run
    from training.mllm import MultimodalLM, keep_4bit_layout, load_llm, resolve_dtype

    system = describe_system(spec, model_cache)
    if spec.run is not None:
        model, tokenizer, _ = load_run(spec.run, device=device)
    else:
        llm, tokenizer = load_llm(system.model_path, quantization=spec.quantization, dtype=resolve_dtype("auto", device), device=device)
        model = MultimodalLM(llm).eval()
    # 4-bit weights computed with as trained (and as the vLLM backend's dequantized copy has them), not
    # repacked lossily by bitsandbytes on AVX512-BF16 CPUs at the first forward
    keep_4bit_layout(model.llm)
    return model, tokenizer, system.model_path, system.modality, system.soft_tokens, system.system_prompt, system.notes


def load_pairs(store: Store, config: EvaluateConfig, split: str, modality: str) -> tuple[list[Pair], list[str], list[list[str]]]:
    """The pairs (sorted by key, first `limit`) with the utterance embeddings the modality needs (a zero
    vector where a clip had none: every system gets the same pairs), each pair's next-utterance
    emotion label, and its dialogue history (the reference system compared replies with the history)."""
    targets = store.targets(config.target, split=split, columns=["key", "history", "next_speaker", "target", "next_emotion"])
    if targets.num_rows == 0:
        raise ValueError(f"no {config.target!r} targets for {split} in {store.root}: run `merg targets build --kind {config.target}`")
    rows = (targets.slice(0, config.limit) if config.limit else targets).to_pylist()
    column = COLUMNS[modality]
    media = store.vectors(column, split=split) if column else {}
    zero = np.zeros(store.fused_dim if column == "fused_emb" else store.embedding_dim, dtype=np.float32)
    pairs = [Pair(r["key"], r["history"], r["next_speaker"], r["target"], media.get(r["key"], zero) if column else None) for r in rows]
    return pairs, [r["next_emotion"] for r in rows], [r["history"] for r in rows]


def pairs_without_clip(pairs: list[Pair]) -> int:
    """How many pairs got the zero vector because their utterance has no embedding (no clip)."""
    return sum(p.media is not None and not p.media.any() for p in pairs)


def _mean_ci(values: np.ndarray, config: EvaluateConfig) -> dict:
    lo, hi = bootstrap_ci(len(values), lambda i: values[i].mean(), samples=config.bootstrap_samples, seed=config.seed)
    return {"value": float(values.mean()) if len(values) else float("nan"), "ci": [lo, hi]}


def _corpus_ci(n: int, statistic, config: EvaluateConfig) -> dict:
    lo, hi = bootstrap_ci(n, statistic, samples=config.bootstrap_samples, seed=config.seed)
    return {"value": float(statistic(np.arange(n))), "ci": [lo, hi]}


def _utterance_text(line: str) -> str:
    return line.split(":", 1)[1].strip() if ":" in line else line


class CellInterrupted(BaseException):
    """SIGTERM while a cell runs (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""


@contextmanager
def stop_on_sigterm():
    """SIGTERM raises `CellInterrupted` here (in the main thread only: signals go there), so a cell stores
    its finished batches before it stops; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise CellInterrupted(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def plan_batches(tokenizer, pairs: list[Pair], *, system: str, soft_tokens: int, max_length: int, max_new_tokens: int,
                 batch_size: int) -> list[list[int]]:  # fmt: skip
    """The cell's batches: pair indices sorted by prompt length (little padding), `batch_size` at a time.
    A fixed partition of the cell, so every attempt computes a batch the same way."""
    lengths = [len(generation_prompt(tokenizer, p, system=system, soft_tokens=soft_tokens, max_length=max_length,
                                     max_new_tokens=max_new_tokens)) for p in pairs]  # fmt: skip
    order = sorted(range(len(pairs)), key=lambda i: (lengths[i], pairs[i].key))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def stored_keys(store: Store, cell_id: str) -> set[str]:
    return set(store.read_records(EVAL_OUTPUTS, build_filter(cell=cell_id), ["key"]).column("key").to_pylist())


class Progress:
    """The cell's row in `cell_progress`: written when an attempt starts, after every chunk it stores and
    when it ends, so any process can read how far the cell is (`merg sweep --status`)."""

    def __init__(self, store: Store, cell: Cell, cell_id: str, backend: str):
        self.store, self.cell, self.cell_id = store, cell, cell_id
        previous = store.read_records(CELL_PROGRESS, build_filter(cell=cell_id)).to_pylist()
        self.previous = previous[0] if previous else None
        self.row = dict(cell=cell_id, system=cell.system.name, preset=cell.preset, split=cell.split, status="running",
                        attempt=(self.previous or {}).get("attempt", 0) + 1, pid=os.getpid(), node=_node(), backend=backend,
                        started_at=datetime.now(timezone.utc), redone=0, reused=0, done=0)  # fmt: skip
        self.computed, self.computing_since = 0, None

    def in_flight(self) -> int | None:
        """The chunk an earlier attempt was computing when it stopped (None: it stopped between chunks)."""
        if self.previous and self.previous["status"] in ("running", "interrupted", "failed"):
            return self.previous.get("chunk")
        return None

    def update(self, **fields) -> None:
        self.row.update(fields)
        if self.computed and self.computing_since is not None:
            self.row["seconds_per_example"] = (time.perf_counter() - self.computing_since) / self.computed
        self.store.write_records(CELL_PROGRESS, [dict(self.row, created_at=datetime.now(timezone.utc))])


def _batch_rows(cell_id: str, backend, scorers: Scorers, pairs: list[Pair], next_emotions: list[str],
                replies: list[str], nll: np.ndarray, tokens: np.ndarray) -> list[dict]:  # fmt: skip
    """Per-example output rows of one batch: every per-pair number the cell's aggregates need."""
    references = [p.reference for p in pairs]
    histories = [p.history for p in pairs]
    self_nll, self_tokens = backend.context_free([first_sentence(r) for r in replies])
    uncond_nll, uncond_tokens = backend.context_free(references)
    bert = scorers.bertscore(replies, references)
    p_reply, p_ref = scorers.emotion.probs(replies), scorers.emotion.probs(references)
    # the reference system's emotion/sentiment baseline: the mean over the dialogue-history utterances
    flat = [_utterance_text(line) for h in histories for line in h]
    p_flat, s_flat = scorers.emotion.probs(flat), vader_compound(flat)
    bounds = np.cumsum([0] + [len(h) for h in histories])
    p_hist = np.stack([p_flat[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
    s_hist = np.array([s_flat[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])
    s_reply, s_ref = vader_compound(replies), vader_compound(references)
    emo, emo_hist = emotion_alignment(p_reply, p_ref), emotion_alignment(p_reply, p_hist)
    sent, sent_hist = sentiment_alignment(s_reply, s_ref), sentiment_alignment(s_reply, s_hist)
    reply_label = [EMOTIONS[i] for i in p_reply.argmax(axis=1)]
    ref_label = [EMOTIONS[i] for i in p_ref.argmax(axis=1)]
    return [
        dict(id=f"{cell_id}:{p.key}", cell=cell_id, key=p.key, history=p.history, next_speaker=p.next_speaker,
             reference=p.reference, reply=replies[i], next_emotion=next_emotions[i], reply_emotion=reply_label[i],
             reference_emotion=ref_label[i], nll=float(nll[i]), tokens=int(tokens[i]), bertscore_f1=float(bert.f1[i]),
             bertscore_p=float(bert.precision[i]), bertscore_r=float(bert.recall[i]), emotion_alignment=float(emo[i]),
             sentiment_alignment=float(sent[i]), emotion_alignment_history=float(emo_hist[i]),
             sentiment_alignment_history=float(sent_hist[i]), self_nll=float(self_nll[i]), self_tokens=int(self_tokens[i]),
             uncond_nll=float(uncond_nll[i]), uncond_tokens=int(uncond_tokens[i]))
        for i, p in enumerate(pairs)
    ]  # fmt: skip


def aggregate(rows: list[dict], ec: EvaluateConfig, scorers: Scorers) -> dict:
    """The cell's metrics, each with its bootstrap 95% interval, from its per-example rows (sorted by key)."""
    column = lambda name: np.array([r[name] for r in rows], dtype=np.float64)  # noqa: E731
    replies, histories = [r["reply"] for r in rows], [r["history"] for r in rows]
    nll, tokens = column("nll"), column("tokens")
    self_nll, self_tokens, uncond_nll, uncond_tokens = column("self_nll"), column("self_tokens"), column("uncond_nll"), column("uncond_tokens")
    emo, sent, emo_hist, sent_hist = (column(k) for k in ("emotion_alignment", "sentiment_alignment", "emotion_alignment_history",
                                                          "sentiment_alignment_history"))  # fmt: skip
    correct = np.array([r["reply_emotion"] == r["next_emotion"] for r in rows], dtype=np.float64)
    matches_reference = np.array([r["reply_emotion"] == r["reference_emotion"] for r in rows], dtype=np.float64)
    dist1_reply, dist2_reply = reply_distinct_n(replies, 1), reply_distinct_n(replies, 2)
    n = len(rows)
    bert_description = scorers.bertscore.description
    return {
        "ppl": _corpus_ci(n, lambda i: perplexity(nll[i], tokens[i]), ec),
        "ref_self_ppl": _corpus_ci(n, lambda i: perplexity(self_nll[i], self_tokens[i]), ec),
        "ref_uncond_ppl": _corpus_ci(n, lambda i: perplexity(uncond_nll[i], uncond_tokens[i]), ec),
        # corpus-level Dist-n depends on corpus size (a resample with repeats has fewer distinct n-grams),
        # so it gets no bootstrap interval; the per-reply mean does
        "dist1": {"value": distinct_n(replies, 1)},
        "dist2": {"value": distinct_n(replies, 2)},
        "dist1_mean": _mean_ci(dist1_reply[~np.isnan(dist1_reply)], ec),
        "dist2_mean": _mean_ci(dist2_reply[~np.isnan(dist2_reply)], ec),
        "bertscore_p": _mean_ci(column("bertscore_p"), ec),
        "bertscore_r": _mean_ci(column("bertscore_r"), ec),
        "bertscore_f1": _mean_ci(column("bertscore_f1"), ec),
        "emotion": _mean_ci(emo, ec),
        "sentiment": _mean_ci(sent, ec),
        "empathy": _mean_ci((emo + sent) / 2, ec),
        "emotion_accuracy": _mean_ci(correct, ec),
        "emotion_label_match": _mean_ci(matches_reference, ec),
        **{name: {"value": value} for name, value in copy_statistics(replies, histories).items()},
        "ref_emotion": _mean_ci(emo_hist, ec),
        "ref_sentiment": _mean_ci(sent_hist, ec),
        "ref_empathy": _mean_ci((emo_hist + sent_hist) / 2, ec),
        "descriptions": {
            "dist": f"Dist-n over all replies (corpus level, Li et al. 2016; no interval: it depends on the corpus size, which a resample with repeats changes) and per reply averaged over replies with an n-gram (dist*_mean); tokens: {TOKENIZER}",
            "bertscore": bert_description, "emotion_backend": scorers.emotion.name,
            "emotion": f"cosine of the reply's and the reference reply's emotion distributions ({scorers.emotion.name}); the reference is the {ec.target} target",
            "emotion_accuracy": "share of replies whose top emotion (classifier) equals MELD's human label of the real next line"
                                + (" (not of the teacher's reference reply)" if ec.target == "teacher" else ""),
            "emotion_label_match": "share of replies whose top emotion equals the classifier's top emotion of the reference reply (the confusion plot's axes)",
            "copying": f"copy_share: replies whose longest common substring with the history is >= {COPY_THRESHOLD:.0%} of the reply; scaffold_share: replies starting with the prompt's words; empty_share; distinct_replies",
            "sentiment": "VADER compound, alignment 1 - |difference|",
            "ppl": "teacher-forced on the gold reply + EOS given the prompt, exp(total NLL / total tokens) over the set (a corpus ratio, not a mean)",
            "ref_*": "the reference system's definitions: reply vs dialogue-history mean; self / unconditioned perplexity",
        },  # fmt: skip
    }


def _chunks(batches: list[list[int]], per_chunk: int) -> list[list[list[int]]]:
    return [batches[i : i + per_chunk] for i in range(0, len(batches), per_chunk)]


def evaluate_cell(cell: Cell, config: MergConfig, scorers: Scorers | None = None, cell_id: str | None = None) -> dict:
    """Compute what the store lacks of the cell's per-example rows (in chunks, resuming where an earlier
    attempt stopped), then its aggregates from the stored rows; returns its `eval_results` row."""
    ec = config.evaluate
    started = time.perf_counter()
    store = Store.open(config.paths.store)
    cell_id = cell_id or cell.id(ec, resolve_inputs(config, store, [cell.split]))
    progress = Progress(store, cell, cell_id, ec.backend)
    try:
        with stop_on_sigterm():
            system = describe_system(cell.system, config.paths.model_cache)
            pairs, next_emotions, _ = load_pairs(store, ec, cell.split, system.modality)
            stored = stored_keys(store, cell_id)
            progress.update(total=len(pairs), done=sum(p.key in stored for p in pairs), reused=sum(p.key in stored for p in pairs))
            scorers = scorers or Scorers(ec, config.paths.model_cache)
            log.info("cell %s: %s / %s / %s, %d pairs, %d stored", cell_id, cell.system.name, cell.preset, cell.split, len(pairs),
                     progress.row["done"])  # fmt: skip
            if progress.row["done"] < len(pairs):
                _compute_missing(cell, cell_id, config, system, pairs, next_emotions, stored, scorers, progress)
        rows = store.read_records(EVAL_OUTPUTS, build_filter(cell=cell_id)).to_pylist()
        by_key = {r["key"]: r for r in rows}
        if missing := [p.key for p in pairs if p.key not in by_key]:
            raise RuntimeError(f"{len(missing)} of {len(pairs)} examples are not in the store after the cell ran (e.g. {missing[0]})")
        metrics = aggregate([by_key[p.key] for p in pairs], ec, scorers)
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, CellInterrupted))
        try:
            progress.update(status="interrupted" if stopped else "failed", error=f"{type(exc).__name__}: {exc}"[-2000:])
        except Exception as write_error:  # the cell's own error is the one to report
            log.warning("cell %s: progress not recorded: %s", cell_id, write_error)
        raise
    notes = list(system.notes)
    if missing_clip := pairs_without_clip(pairs):
        notes.append(f"{cell.system.name}: {missing_clip} of {len(pairs)} pairs have no clip ({system.modality} input: a zero vector)")
    if COLUMNS[system.modality]:
        encoders = set(store.query(split=cell.split, columns=["encoder_checkpoint"]).column(0).drop_null().to_pylist())
        if any(e.startswith("random-init") for e in encoders):
            notes.append("embeddings: ImageBind at random init (no imagebind_huge.pth given)")
    if not scorers.bertscore.baseline:
        notes.append(f"BERTScore: {scorers.bertscore.description}")
    if ec.backend == "vllm":
        notes.append(f"replies: vLLM (continuous batching); gold-reply and context-free scores: {'HF' if system.soft_tokens else 'vLLM'}")
    progress.update(status="scored", done=len(pairs), chunk=None)
    return dict(
        cell=cell_id, sweep=cell.sweep, system=cell.system.name, model=str(system.model_path), modality=system.modality,
        run=str(cell.system.run) if cell.system.run else None, preset=cell.preset, split=cell.split, target=ec.target,
        status="done", examples=len(pairs), metrics=json.dumps(metrics), notes="; ".join(notes) or None,
        config_hash=config.fingerprint(), store_version=store.version, seconds=time.perf_counter() - started,
        node=_node(),
    )  # fmt: skip


def _compute_missing(cell: Cell, cell_id: str, config: MergConfig, system: SystemInfo, pairs: list[Pair],
                     next_emotions: list[str], stored: set[str], scorers: Scorers, progress: Progress) -> None:  # fmt: skip
    """The batches with an example not in the store, chunk by chunk: each chunk's rows are stored as one
    commit when it ends, and the finished batches of the chunk when the cell is stopped or fails."""
    ec = config.evaluate
    preset = PRESETS[cell.preset]
    system_prompt = system.system_prompt or ec.system_prompt
    with _backend(ec, cell, system, config.paths.model_cache, system_prompt) as backend:
        batches = plan_batches(backend.tokenizer, pairs, system=system_prompt, soft_tokens=system.soft_tokens,
                               max_length=ec.max_length, max_new_tokens=preset.max_new_tokens, batch_size=ec.batch_size)  # fmt: skip
        chunks = _chunks(batches, max(1, -(-ec.chunk_size // ec.batch_size)))  # whole batches, about chunk_size examples
        in_flight = progress.in_flight()
        progress.computing_since = time.perf_counter()
        for index, chunk in enumerate(chunks):
            todo = [b for b in chunk if any(pairs[i].key not in stored for i in b)]
            if not todo:
                continue
            progress.update(chunk=index, chunks=len(chunks), redone=progress.row["redone"] + (index == in_flight))
            rows: list[dict] = []
            try:
                for batch, (replies, nll, tokens) in zip(todo, backend([[pairs[i] for i in b] for b in todo])):
                    rows += _batch_rows(cell_id, backend, scorers, [pairs[i] for i in batch], [next_emotions[i] for i in batch],
                                        replies, nll, tokens)  # fmt: skip
            finally:  # also when stopped or failing: the finished batches are kept
                if rows:
                    progress.store.write_records(EVAL_OUTPUTS, rows)
                    progress.computed += len(rows)
                    progress.row["done"] += len(rows)
                    stored |= {r["key"] for r in rows}
            progress.update(chunk=None)


class HFBackend:
    """Replies and scores by HF in this process: `generate_and_score` per batch (one prompt pass for both)."""

    def __init__(self, model, tokenizer, ec: EvaluateConfig, preset, system_prompt: str, soft_tokens: int):
        self.model, self.tokenizer, self.ec, self.preset = model, tokenizer, ec, preset
        self.system_prompt, self.soft_tokens = system_prompt, soft_tokens

    def __enter__(self) -> "HFBackend":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __call__(self, batches: list[list[Pair]]):
        """Each batch's (replies, gold-reply NLL, token counts), batch by batch."""
        for batch in batches:
            yield generate_and_score(self.model, self.tokenizer, batch, self.preset, system=self.system_prompt,
                                     soft_tokens=self.soft_tokens, max_length=self.ec.max_length, batch_size=len(batch),
                                     seed=self.ec.seed)  # fmt: skip

    def context_free(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return score_without_context(self.model, self.tokenizer, texts, self.ec.batch_size)


def _backend(ec: EvaluateConfig, cell: Cell, system: SystemInfo, model_cache: Path, system_prompt: str):
    """The cell's generation backend (a context): HF in this process, or vLLM in its own environment."""
    preset = PRESETS[cell.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ec.backend == "vllm":
        from evaluation.vllm_backend import VllmBackend

        return VllmBackend(ec, cell.system, system, model_cache, system_prompt, preset, device)
    model, tokenizer, *_ = load_system(cell.system, model_cache, device)
    return HFBackend(model, tokenizer, ec, preset, system_prompt, system.soft_tokens)


def _node() -> str:
    import socket

    import ray

    if ray.is_initialized():
        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    return socket.gethostname()
