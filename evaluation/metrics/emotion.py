"""Emotion distributions over MELD's 7 labels, and emotion alignment.

Backends (each `probs(texts) -> (n, 7)` in `featurestore.schema.EMOTIONS` order):
- `MeldEmotionClassifier`: merg's own, trained on MELD's real text (`train_meld_emotion_classifier`):
  the embedded MiniLM sentence encoder (frozen) + a logistic-regression head, 7 MELD labels. The
  default once trained, since it speaks MELD's labels.
- `LexiconEmotion`: the NRC emotion lexicon (`nrclex`, offline): its anger/disgust/fear/joy/sadness/
  surprise words counted; neutral when none fires. The fallback.
- `HFEmotion`: any local HF sequence classifier; its labels mapped by name (love -> joy), labels it
  lacks (a 6-class Twitter model has no neutral or disgust) get probability 0.

Alignment: cosine similarity of two distributions (the reference system's definition, applied to
reply vs reference and, labelled, reply vs dialogue-history mean).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from evaluation.metrics.distinct import word_tokens
from featurestore.schema import EMOTION_ID, EMOTIONS

log = logging.getLogger(__name__)

MELD_CLASSIFIER_DIR = "meld-emotion-minilm"
_LABEL_ALIASES = {"love": "joy", "happiness": "joy", "happy": "joy", "sad": "sadness", "angry": "anger",
                  "surprised": "surprise", "disgusted": "disgust", "scared": "fear", "none": "neutral", "others": "neutral"}  # fmt: skip


class EmotionBackend(Protocol):
    name: str

    def probs(self, texts: Sequence[str]) -> np.ndarray: ...


def emotion_alignment(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, 7) distributions (0 where either is all zeros)."""
    norms = np.linalg.norm(p, axis=1) * np.linalg.norm(q, axis=1)
    return np.divide((p * q).sum(axis=1), norms, out=np.zeros(len(p)), where=norms > 0)


class LexiconEmotion:
    name = "nrc-lexicon"

    def __init__(self):
        from nrclex import NRCLex

        self._lexicon = NRCLex(None)

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(EMOTIONS)))
        for row, text in enumerate(texts):
            self._lexicon.load_token_list(word_tokens(text or ""))  # our tokenizer: TextBlob's needs NLTK data
            for emotion, count in self._lexicon.raw_emotion_scores.items():
                if emotion in EMOTION_ID:
                    out[row, EMOTION_ID[emotion]] += count
            if out[row].sum() == 0:
                out[row, EMOTION_ID["neutral"]] = 1.0
        return out / out.sum(axis=1, keepdims=True)


class HFEmotion:
    def __init__(self, path: Path | str, batch_size: int = 64, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = Path(path).name
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(device).eval()
        self.batch_size, self.device, self._torch = batch_size, device, torch
        labels = [self.model.config.id2label[i].lower() for i in range(self.model.config.num_labels)]
        self.columns = [EMOTION_ID.get(_LABEL_ALIASES.get(label, label)) for label in labels]
        if all(c is None for c in self.columns):
            raise ValueError(f"{path}: none of its labels {labels} maps onto MELD's {EMOTIONS}")

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(EMOTIONS)))
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer([t or "" for t in texts[start : start + self.batch_size]], padding=True,
                                   truncation=True, max_length=128, return_tensors="pt").to(self.device)  # fmt: skip
            with self._torch.no_grad():
                p = self.model(**batch).logits.softmax(-1).cpu().numpy()
            for source, target in enumerate(self.columns):
                if target is not None:
                    out[start : start + len(p), target] += p[:, source]
        return out


class SentenceEncoder:
    """The embedded MiniLM as sentence-transformers uses it: mean pooling over tokens, L2-normalised."""

    def __init__(self, path: Path | str | None = None, batch_size: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from infra.models import resolve_bertscore_model

        self.path = Path(path) if path else resolve_bertscore_model()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path)).eval()
        self.batch_size, self._torch = batch_size, torch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer([t or "" for t in texts[start : start + self.batch_size]], padding=True,
                                   truncation=True, max_length=128, return_tensors="pt")  # fmt: skip
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.hidden_size))


class MeldEmotionClassifier:
    """Frozen MiniLM sentence embeddings + logistic regression over MELD's 7 labels."""

    def __init__(self, folder: Path | str):
        from safetensors.numpy import load_file

        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        if tuple(self.meta["labels"]) != EMOTIONS:
            raise ValueError(f"{folder}: labels {self.meta['labels']} are not MELD's {EMOTIONS}")
        weights = load_file(folder / "classifier.safetensors")
        self.coef, self.intercept = weights["coef"], weights["intercept"]
        self.encoder = SentenceEncoder()
        self.name = f"meld-minilm-lr (test weighted-F1 {self.meta['test']['weighted_f1']:.3f})"

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        logits = self.encoder(texts) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def train_meld_emotion_classifier(
    meld_text: Path, out: Path, cs: Sequence[float] = (0.3, 1.0, 3.0, 10.0), limit: int | None = None
) -> dict:
    """Fit on MELD train, choose C on dev (weighted F1), report test; write `out/` and return the report.
    `limit`: first N utterances per split (tests)."""
    from safetensors.numpy import save_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    from pipelines.meld import read_split

    encoder = SentenceEncoder()
    data = {}
    for split in ("train", "dev", "test"):
        records = read_split(meld_text, split).records[:limit]
        data[split] = (encoder([r.text for r in records]), np.array([EMOTION_ID[r.emotion] for r in records]))
    best = None
    for c in cs:
        model = LogisticRegression(C=c, max_iter=3000).fit(*data["train"])
        f1 = f1_score(data["dev"][1], model.predict(data["dev"][0]), average="weighted")
        log.info("C=%g: dev weighted-F1 %.4f", c, f1)
        if best is None or f1 > best[0]:
            best = (f1, c, model)
    dev_f1, c, model = best
    predicted = model.predict(data["test"][0])
    report = dict(
        labels=list(EMOTIONS), encoder="all-MiniLM-L6-v2 (frozen, mean pooling)", head="logistic regression",
        C=c, dev={"weighted_f1": dev_f1},
        test={"weighted_f1": f1_score(data["test"][1], predicted, average="weighted"),
              "accuracy": accuracy_score(data["test"][1], predicted),
              "per_class": classification_report(data["test"][1], predicted, labels=list(range(len(EMOTIONS))),
                                                 target_names=list(EMOTIONS), output_dict=True, zero_division=0)},
        sizes={s: int(len(y)) for s, (_, y) in data.items()},
    )  # fmt: skip
    coef = np.zeros((len(EMOTIONS), model.coef_.shape[1]), np.float32)
    intercept = np.full(len(EMOTIONS), -1e4, np.float32)  # a label absent from train is never predicted
    coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_
    out.mkdir(parents=True, exist_ok=True)
    save_file({"coef": coef, "intercept": intercept}, out / "classifier.safetensors")
    (out / "meta.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def resolve_emotion_backend(spec: str, model_cache: Path) -> str:
    """`auto` made concrete: `meld` once merg's MELD classifier is trained, else `lexicon`."""
    if spec == "auto":
        return "meld" if (Path(model_cache) / MELD_CLASSIFIER_DIR / "meta.json").is_file() else "lexicon"
    return spec


def emotion_backend_folder(spec: str, model_cache: Path) -> Path | None:
    """The weights behind a resolved backend (None for the lexicon)."""
    if spec == "lexicon":
        return None
    return Path(model_cache) / MELD_CLASSIFIER_DIR if spec == "meld" else Path(spec)


def load_emotion_backend(spec: str, model_cache: Path) -> EmotionBackend:
    """`auto` (merg's MELD classifier when trained, else the lexicon), `meld`, `lexicon`, or a local HF folder."""
    trained = Path(model_cache) / MELD_CLASSIFIER_DIR
    spec = resolve_emotion_backend(spec, model_cache)
    if spec == "lexicon":
        return LexiconEmotion()
    if spec == "meld":
        if not (trained / "meta.json").is_file():
            raise FileNotFoundError(f"merg's MELD emotion classifier is not trained ({trained}): run `merg evaluate train-emotion-classifier`")
        return MeldEmotionClassifier(trained)
    return HFEmotion(spec)
