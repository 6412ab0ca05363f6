"""`probe(store)`: does the store's preprocessing carry emotion? A linear probe per feature.

    rows = probe(Store.open("data/demo/store"))   # also written to the store's `probe_results` table

For each feature (`text` through the embedded MiniLM sentence encoder, and each embedding column the
store holds: `audio_emb`, `vision_emb`, `fused_emb`): logistic regression on MELD's 7 emotion labels,
fit on train, C chosen on dev (weighted-F1), scored on test: weighted-F1 and accuracy with bootstrap 95%
intervals, per-class F1, and the majority-class baseline (train's most frequent label for every test
utterance). Utterances without the feature (no clip) are left out and counted. A probe whose id (the
feature's content and labels, the encoder's weights, the settings) is already stored is not redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Sequence

import numpy as np
import pyarrow.compute as pc

from evaluation.metrics import bootstrap_ci
from featurestore.schema import EMBEDDING_COLUMNS, EMOTION_ID, EMOTIONS, PROBE_RESULTS
from featurestore.store import Store, build_filter

log = logging.getLogger(__name__)

FEATURES = ("text", *EMBEDDING_COLUMNS)
SPLITS = ("train", "dev", "test")
PROBE_VERSION = 1


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _labelled(store: Store, feature: str) -> dict[str, tuple[list[str], list, np.ndarray]]:
    """Per split: keys, the feature's raw values (texts or vectors), label ids; rows without it left out."""
    column = "text" if feature == "text" else feature
    table = store.query(columns=["key", "split", "emotion", column])
    table = table.filter(table.column(column).is_valid()).sort_by("key")
    out = {}
    for split in SPLITS:
        rows = table.filter(pc.equal(table.column("split"), split)).to_pydict()
        keep = [i for i, e in enumerate(rows["emotion"]) if e in EMOTION_ID]
        out[split] = ([rows["key"][i] for i in keep], [rows[column][i] for i in keep],
                      np.array([EMOTION_ID[rows["emotion"][i]] for i in keep], dtype=np.int64))  # fmt: skip
    return out


def _encoder_name(store: Store, feature: str) -> str:
    if feature == "text":
        from evaluation.evaluate import weights_digest
        from infra.models import resolve_bertscore_model

        return f"all-MiniLM-L6-v2 mean pooling ({weights_digest(resolve_bertscore_model())})"
    rows = store.query(columns=["encoder", "encoder_checkpoint", "fusion"], where=f"{feature} IS NOT NULL", limit=1).to_pylist()
    if not rows:
        return "–"
    row = rows[0]
    return f"{row['encoder']} ({row['encoder_checkpoint']})" + (f", fusion {row['fusion']}" if feature == "fused_emb" else "")


def weighted_f1(truth: np.ndarray, predicted: np.ndarray, classes: int = len(EMOTIONS)) -> float:
    """sklearn's f1_score(average="weighted", zero_division=0) with bincounts: the bootstrap calls it
    thousands of times, and sklearn's input validation would dominate the probe's time."""
    tp = np.bincount(truth[truth == predicted], minlength=classes)
    support, guessed = np.bincount(truth, minlength=classes), np.bincount(predicted, minlength=classes)
    denominator = support + guessed
    f1 = np.divide(2 * tp, denominator, out=np.zeros(classes), where=denominator > 0)
    return float((f1 * support).sum() / support.sum()) if support.sum() else 0.0


def fit_probe(data: dict[str, tuple[np.ndarray, np.ndarray]], cs: Sequence[float], samples: int, seed: int) -> dict:
    """Logistic regression on train, C by dev weighted-F1, test scores with intervals and the majority baseline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    (x_train, y_train), (x_dev, y_dev), (x_test, y_test) = (data[s] for s in SPLITS)
    best = None
    for c in cs:
        model = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)
        dev_f1 = f1_score(y_dev, model.predict(x_dev), average="weighted")
        if best is None or dev_f1 > best[0]:
            best = (dev_f1, c, model)
    dev_f1, c, model = best
    predicted = model.predict(x_test)
    majority = np.full_like(y_test, np.bincount(y_train).argmax())

    def scored(prediction: np.ndarray) -> dict:
        f1 = lambda i: weighted_f1(y_test[i], prediction[i])  # noqa: E731
        accuracy = lambda i: float((y_test[i] == prediction[i]).mean())  # noqa: E731
        everything = np.arange(len(y_test))
        return {"weighted_f1": {"value": float(f1(everything)), "ci": list(bootstrap_ci(len(y_test), f1, samples=samples, seed=seed))},
                "accuracy": {"value": float(accuracy(everything)), "ci": list(bootstrap_ci(len(y_test), accuracy, samples=samples, seed=seed))}}  # fmt: skip

    per_class = f1_score(y_test, predicted, labels=list(range(len(EMOTIONS))), average=None, zero_division=0)
    return dict(C=c, dev_weighted_f1=float(dev_f1), test=scored(predicted), majority=scored(majority),
                majority_label=EMOTIONS[int(majority[0])] if len(majority) else None,
                per_class_f1={e: float(v) for e, v in zip(EMOTIONS, per_class)})  # fmt: skip


def probe(
    store: Store, features: Sequence[str] = FEATURES, *, cs: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0),
    samples: int = 1000, seed: int = 0, force: bool = False,
) -> list[dict]:  # fmt: skip
    """One `probe_results` row per feature (done, or skipped with the reason), written to the store."""
    from evaluation.metrics.emotion import SentenceEncoder

    done = {r["id"]: r for r in store.read_records(PROBE_RESULTS, build_filter(status="done")).to_pylist()}
    encoder = None
    rows = []
    for feature in features:
        started = time.perf_counter()
        labelled = _labelled(store, feature)
        sizes = {s: len(labelled[s][2]) for s in SPLITS}
        name = _encoder_name(store, feature)
        raw = {s: labelled[s][1] for s in SPLITS}
        if feature != "text":
            raw = {s: np.asarray(v, dtype=np.float32) if v else np.zeros((0, 1), np.float32) for s, v in raw.items()}
        probe_id = _digest(feature, name, [labelled[s][0] for s in SPLITS], *[labelled[s][2] for s in SPLITS],
                           *(raw[s] for s in SPLITS), list(cs), samples, seed, PROBE_VERSION)  # fmt: skip
        if probe_id in done and not force:
            rows.append(done[probe_id])
            continue
        row = dict(id=probe_id, feature=feature, encoder=name, sizes=json.dumps(sizes), store_version=store.version)
        missing = [s for s in SPLITS if sizes[s] < 2] + (["train labels"] if len(set(labelled["train"][2].tolist())) < 2 else [])
        if missing:
            row.update(status="skipped", error=f"too few labelled utterances with {feature} in: {', '.join(missing)}")
        else:
            if feature == "text":
                encoder = encoder or SentenceEncoder()
                raw = {s: encoder(texts) for s, texts in raw.items()}
            metrics = fit_probe({s: (raw[s], labelled[s][2]) for s in SPLITS}, cs, samples, seed)
            row.update(status="done", metrics=json.dumps(metrics))
        row["seconds"] = time.perf_counter() - started
        log.info("probe %s: %s (%.1f s)", feature, row["status"], row["seconds"])
        store.write_records(PROBE_RESULTS, [row])
        rows.append(row)
    return rows


def probe_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for reports and the CLI: one row per feature, newest probe of each."""
    from evaluation.report import _fmt

    latest: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: str(r.get("created_at") or "")):
        latest[row["feature"]] = row
    header = ["Feature", "Encoder", "Train/dev/test", "C", "Test W-F1", "Test acc.", "Majority W-F1", "Majority acc.", "Per-class F1 (test)"]
    body = []
    for feature in [f for f in FEATURES if f in latest] + sorted(set(latest) - set(FEATURES)):
        row = latest[feature]
        sizes = json.loads(row["sizes"] or "{}")
        split_sizes = "/".join(str(sizes.get(s, 0)) for s in SPLITS)
        if row["status"] != "done":
            body.append([feature, row["encoder"] or "–", split_sizes, "–", f"skipped: {row['error']}", "–", "–", "–", "–"])
            continue
        m = json.loads(row["metrics"])
        per_class = ", ".join(f"{e} {v:.2f}" for e, v in m["per_class_f1"].items())
        body.append([feature, row["encoder"], split_sizes, f"{m['C']:g}", _fmt(m["test"]["weighted_f1"]), _fmt(m["test"]["accuracy"]),
                     _fmt(m["majority"]["weighted_f1"]), _fmt(m["majority"]["accuracy"]), per_class])  # fmt: skip
    return header, body
