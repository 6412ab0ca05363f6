"""BERTScore P/R/F1 through `bert-score`, with a local model (nothing is downloaded).

Default: the embedded all-MiniLM-L6-v2 at its last layer (6), not rescaled (no official baseline
exists for it). With a local roberta-large (layer 17, bert-score's default for English) the official
baseline shipped inside bert-score is applied: rescaled = (raw - b) / (1 - b), b_F = 0.8312.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from infra.models import resolve_bertscore_model


def rescale(values: np.ndarray, baseline: float) -> np.ndarray:
    return (np.asarray(values) - baseline) / (1.0 - baseline)


def official_baseline(model_name: str, layer: int, lang: str = "en") -> tuple[float, float, float] | None:
    """(P, R, F) baseline that bert-score ships for `model_name` at `layer`, or None."""
    path = resources.files("bert_score") / "rescale_baseline" / lang / f"{model_name}.tsv"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines()[1:]:
        fields = line.split(",")
        if int(fields[0]) == layer:
            return float(fields[1]), float(fields[2]), float(fields[3])
    return None


@dataclass
class BertScores:
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    rescaled: bool
    description: str


class BertScorer:
    def __init__(self, model: str | Path | None = None, num_layers: int | None = None, batch_size: int = 64, device: str | None = None):
        from transformers import AutoConfig

        self.path = resolve_bertscore_model(str(model)) if model else resolve_bertscore_model()
        config = AutoConfig.from_pretrained(self.path)
        self.name = "all-MiniLM-L6-v2" if model is None else Path(self.path).name
        self.num_layers = num_layers or (17 if "roberta-large" in self.name else config.num_hidden_layers)
        self.baseline = official_baseline(self.name, self.num_layers)
        from bert_score import BERTScorer

        # the model is loaded once here, not per call (bert_score.score reloads it every time)
        self._scorer = BERTScorer(model_type=str(self.path), num_layers=self.num_layers, batch_size=batch_size, device=device)

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> BertScores:
        """Scores per pair. A pair with a blank reply or reference scores 0 (P, R and F1) by definition:
        there is nothing to match, and bert-score cannot embed an empty string with every tokenizer."""
        p, r, f = (np.zeros(len(candidates)) for _ in range(3))
        scored = [i for i, (c, ref) in enumerate(zip(candidates, references)) if (c or "").strip() and (ref or "").strip()]
        if scored:
            raw = self._scorer.score([candidates[i] for i in scored], [references[i] for i in scored])
            raw = [x.numpy().astype(np.float64) for x in raw]
            if self.baseline:
                raw = [rescale(x, b) for x, b in zip(raw, self.baseline)]
            for target, values in zip((p, r, f), raw):
                target[scored] = values
        return BertScores(p, r, f, self.baseline is not None, self.description)

    @property
    def description(self) -> str:
        state = "rescaled with bert-score's baseline" if self.baseline else "not rescaled (no official baseline)"
        return f"{self.name} layer {self.num_layers}, {state}; a blank reply scores 0"
