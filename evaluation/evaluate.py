"""One evaluation cell: a system x a decoding preset x a split, on the same pairs for every system.

    rows, result = evaluate_cell(Cell(sweep, system, preset, split), config)

Steps: load the pairs (targets of `evaluate.target` with the utterance embeddings the system needs),
load the system (a trained run, or a pretrained model for text-only), generate replies in batches,
score the gold replies teacher-forced, then the metrics (`evaluation.metrics`), each aggregate with a
bootstrap 95% interval. Both definitions are computed: the standard ones (reply vs reference) and
the reference system's (reply vs dialogue history; self/unconditioned perplexities), labelled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.generate import PRESETS, Pair, first_sentence, generate_and_score, score_without_context
from evaluation.metrics import bootstrap_ci, distinct_n, perplexity, sentiment_alignment, vader_compound
from evaluation.metrics.bertscore import BertScorer
from evaluation.metrics.copying import COPY_THRESHOLD, copy_statistics
from evaluation.metrics.distinct import TOKENIZER, reply_distinct_n
from evaluation.metrics.emotion import emotion_alignment, load_emotion_backend
from featurestore.schema import EMOTIONS
from featurestore.store import Store
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
        reused, by any sweep): the system and its weights, decoding, split, the settings, the targets'
        content and the resolved metric backends with their weights. Not the sweep's name."""
        settings = config.model_dump(mode="json", include={"target", "limit", "system_prompt", "max_length",
                                                          "bootstrap_samples", "seed"})  # fmt: skip
        run = run_fingerprint(self.system.run) if self.system.run else None
        blob = json.dumps([self.system.model_dump(mode="json"), self.preset, self.split, settings, run,
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
    pretrained = {}
    for system in ec.systems:
        if system.run is None and system.model not in pretrained:
            try:
                pretrained[system.model] = weights_digest(resolve_llm(system.model, cache))
            except Exception:  # a missing model fails its cell with the reason, not the plan
                pretrained[system.model] = None
    return CellInputs(
        targets=targets, emotion_backend=f"{backend}:{weights_digest(folder) if folder else ''}",
        bertscore=f"{Path(bert).name}:{ec.bertscore_layers}:{weights_digest(bert)}", pretrained=pretrained,
    )  # fmt: skip


_FULL_HASH_BYTES = 256 << 20


def weights_digest(folder: Path | str) -> str | None:
    """Digest of a model folder's weights and configs: small files whole; a file over 256 MiB by its
    size and its first and last MiB (hashing a 7B checkpoint whole would cost more than the plan)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in
                                                     (".safetensors", ".bin", ".pt", ".pth", ".json", ".model"))  # fmt: skip
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder) if path != folder else path.name}:{size}".encode())
        with path.open("rb") as handle:
            if size <= _FULL_HASH_BYTES:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(size - (1 << 20))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def run_fingerprint(run: Path) -> str | None:
    """A trained run's identity: its base model, prompt settings and the bytes of its weights (so a
    retrained run is evaluated again, and a resumed, unchanged one is not)."""
    run = Path(run)
    if not (run / "run.json").is_file():
        return None
    info = json.loads((run / "run.json").read_text())
    digest = hashlib.sha256(json.dumps([info.get(k) for k in ("model", "modality", "soft_tokens", "system_prompt", "max_length")]).encode())
    for path in sorted(p for p in run.rglob("*.safetensors") if "checkpoints" not in p.parts):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Scorers:
    """The metric models (BERTScore encoder, emotion classifier), loaded once per process."""

    def __init__(self, config: EvaluateConfig, model_cache: Path):
        self.bertscore = BertScorer(config.bertscore_model, config.bertscore_layers)
        self.emotion = load_emotion_backend(config.emotion_backend, model_cache)


def load_system(spec: SystemSpec, model_cache: Path, device: torch.device):
    """(model, tokenizer, model path, modality, soft_tokens, system_prompt or None, notes) of a run or a pretrained model."""
    from training import load_run
    from training.mllm import MultimodalLM, load_llm, resolve_dtype

    notes = []
    if spec.run is not None:
        model, tokenizer, info = load_run(spec.run, device=device)
        model_path, modality, soft_tokens, system_prompt = info.model, info.modality, info.soft_tokens, info.system_prompt
    else:
        if spec.modality != "text":
            raise ValueError(f"system {spec.name!r}: a pretrained model has no projector; {spec.modality} needs a trained run")
        path = resolve_llm(spec.model, model_cache)
        llm, tokenizer = load_llm(path, quantization=spec.quantization, dtype=resolve_dtype("auto", device), device=device)
        model, model_path, modality, soft_tokens, system_prompt = MultimodalLM(llm).eval(), str(path), "text", 0, None
    if Path(model_path).resolve() == embedded_llm_dir(model_cache).resolve():
        notes.append("LLM: embedded SmolLM2-135M-Instruct (a small stand-in for 7-8B models)")
    return model, tokenizer, model_path, modality, soft_tokens, system_prompt, notes


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


def evaluate_cell(
    cell: Cell, config: MergConfig, scorers: Scorers | None = None, cell_id: str | None = None
) -> tuple[list[dict], dict]:
    """Per-example output rows and the cell's result row (for the `eval_outputs` / `eval_results` tables)."""
    ec = config.evaluate
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorers = scorers or Scorers(ec, config.paths.model_cache)
    store = Store.open(config.paths.store)
    model, tokenizer, model_path, modality, soft_tokens, run_prompt, notes = load_system(cell.system, config.paths.model_cache, device)
    system_prompt = run_prompt or ec.system_prompt
    pairs, next_emotions, histories = load_pairs(store, ec, cell.split, modality)
    if missing := pairs_without_clip(pairs):
        notes.append(f"{cell.system.name}: {missing} of {len(pairs)} pairs have no clip ({modality} input: a zero vector)")
    if COLUMNS[modality]:
        encoders = set(store.query(split=cell.split, columns=["encoder_checkpoint"]).column(0).drop_null().to_pylist())
        if any(e.startswith("random-init") for e in encoders):
            notes.append("embeddings: ImageBind at random init (no imagebind_huge.pth given)")
    cell_id = cell_id or cell.id(ec, resolve_inputs(config, store, [cell.split]))
    log.info("cell %s: %s / %s / %s, %d pairs", cell_id, cell.system.name, cell.preset, cell.split, len(pairs))

    replies, nll, tokens = generate_and_score(
        model, tokenizer, pairs, PRESETS[cell.preset], system=system_prompt, soft_tokens=soft_tokens,
        max_length=ec.max_length, batch_size=ec.batch_size, seed=ec.seed,
    )  # fmt: skip
    references = [p.reference for p in pairs]
    self_nll, self_tokens = score_without_context(model, tokenizer, [first_sentence(r) for r in replies], ec.batch_size)
    ref_nll, ref_tokens = score_without_context(model, tokenizer, references, ec.batch_size)
    del model
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
    correct = np.array([a == b for a, b in zip(reply_label, next_emotions)], dtype=np.float64)
    matches_reference = np.array([a == b for a, b in zip(reply_label, ref_label)], dtype=np.float64)
    copying = copy_statistics(replies, histories)
    dist1_reply, dist2_reply = reply_distinct_n(replies, 1), reply_distinct_n(replies, 2)

    n = len(pairs)
    metrics = {
        "ppl": _corpus_ci(n, lambda i: perplexity(nll[i], tokens[i]), ec),
        "ref_self_ppl": _corpus_ci(n, lambda i: perplexity(self_nll[i], self_tokens[i]), ec),
        "ref_uncond_ppl": _corpus_ci(n, lambda i: perplexity(ref_nll[i], ref_tokens[i]), ec),
        # corpus-level Dist-n depends on corpus size (a resample with repeats has fewer distinct n-grams),
        # so it gets no bootstrap interval; the per-reply mean does
        "dist1": {"value": distinct_n(replies, 1)},
        "dist2": {"value": distinct_n(replies, 2)},
        "dist1_mean": _mean_ci(dist1_reply[~np.isnan(dist1_reply)], ec),
        "dist2_mean": _mean_ci(dist2_reply[~np.isnan(dist2_reply)], ec),
        "bertscore_p": _mean_ci(bert.precision, ec),
        "bertscore_r": _mean_ci(bert.recall, ec),
        "bertscore_f1": _mean_ci(bert.f1, ec),
        "emotion": _mean_ci(emo, ec),
        "sentiment": _mean_ci(sent, ec),
        "empathy": _mean_ci((emo + sent) / 2, ec),
        "emotion_accuracy": _mean_ci(correct, ec),
        "emotion_label_match": _mean_ci(matches_reference, ec),
        **{name: {"value": value} for name, value in copying.items()},
        "ref_emotion": _mean_ci(emo_hist, ec),
        "ref_sentiment": _mean_ci(sent_hist, ec),
        "ref_empathy": _mean_ci((emo_hist + sent_hist) / 2, ec),
        "descriptions": {
            "dist": f"Dist-n over all replies (corpus level, Li et al. 2016; no interval: it depends on the corpus size, which a resample with repeats changes) and per reply averaged over replies with an n-gram (dist*_mean); tokens: {TOKENIZER}",
            "bertscore": bert.description, "emotion_backend": scorers.emotion.name,
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
    if not scorers.bertscore.baseline:
        notes.append(f"BERTScore: {bert.description}")
    rows = [
        dict(id=f"{cell_id}:{p.key}", cell=cell_id, key=p.key, history=p.history, next_speaker=p.next_speaker,
             reference=p.reference, reply=r, next_emotion=ne, reply_emotion=rl, reference_emotion=fl, nll=float(a),
             tokens=int(t), bertscore_f1=float(f), emotion_alignment=float(e), sentiment_alignment=float(s),
             emotion_alignment_history=float(eh), sentiment_alignment_history=float(sh))
        for p, r, ne, rl, fl, a, t, f, e, s, eh, sh in zip(pairs, replies, next_emotions, reply_label, ref_label, nll,
                                                            tokens, bert.f1, emo, sent, emo_hist, sent_hist)
    ]  # fmt: skip
    result = dict(
        cell=cell_id, sweep=cell.sweep, system=cell.system.name, model=str(model_path), modality=modality,
        run=str(cell.system.run) if cell.system.run else None, preset=cell.preset, split=cell.split, target=ec.target,
        status="done", examples=n, metrics=json.dumps(metrics), notes="; ".join(notes) or None,
        config_hash=config.fingerprint(), store_version=store.version, seconds=time.perf_counter() - started,
        node=_node(),
    )  # fmt: skip
    return rows, result


def _node() -> str:
    import socket

    import ray

    if ray.is_initialized():
        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    return socket.gethostname()
