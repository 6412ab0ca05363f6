"""Synthetic store rows at any scale, for tests and benchmarks (vectorised: 150k rows in seconds).

Embeddings have the shape real encoder outputs have: a centre per emotion plus a point on a
low-dimensional manifold (a 16-d latent mapped linearly into the embedding space) plus a little
isotropic noise. Pure high-dimensional noise would make every neighbour equally far, a case no
real embedding (and no approximate index) faces.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from featurestore.schema import EMOTIONS, SENTIMENTS, SPLITS

_EMOTION_P = np.array([0.472, 0.174, 0.121, 0.111, 0.072, 0.027, 0.027])
_SPEAKERS = np.array(["Rachel", "Ross", "Monica", "Chandler", "Joey", "Phoebe", "Gunther"])


def _fixed(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])


def synthetic_utterances(n: int, dim: int, seed: int = 0, start: int = 0, modalities: bool = True) -> pa.Table:
    """`n` rows with keys `train|dev|test/dia{start+i}_utt0` and unit-norm embeddings."""
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n)
    split = np.array(SPLITS)[rng.choice(3, size=n, p=[0.73, 0.08, 0.19])]
    emotion_idx = rng.choice(len(EMOTIONS), size=n, p=_EMOTION_P / _EMOTION_P.sum())
    shared = np.random.default_rng(12345)  # the same embedding space for every call
    centres = shared.normal(size=(len(EMOTIONS), dim)).astype(np.float32) / np.sqrt(dim)
    mixing = shared.normal(size=(16, dim)).astype(np.float32) / np.sqrt(dim)

    def unit(noise: float) -> np.ndarray:
        latent = rng.normal(size=(n, 16)).astype(np.float32)
        m = centres[emotion_idx] + 0.5 * latent @ mixing + noise * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    columns = {
        "key": pa.array([f"{s}/dia{i}_utt0" for s, i in zip(split, ids)]),
        "split": pa.array(split),
        "dialogue_id": pa.array(ids, pa.int32()),
        "utterance_id": pa.array(np.zeros(n), pa.int32()),
        "speaker": pa.array(_SPEAKERS[rng.integers(len(_SPEAKERS), size=n)]),
        "text": pa.array([f"utterance number {i}" for i in ids]),
        "emotion": pa.array(np.array(EMOTIONS)[emotion_idx]),
        "sentiment": pa.array(np.array(SENTIMENTS)[rng.integers(3, size=n)]),
        "face_visible": pa.array(rng.random(n) < 0.9),
        "fused_emb": _fixed(unit(0.3)),
    }
    if modalities:
        columns["audio_emb"] = _fixed(unit(0.5))
        columns["vision_emb"] = _fixed(unit(0.5))
    return pa.table(columns)
