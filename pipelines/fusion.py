"""Early fusion of ImageBind's audio and vision embeddings into one joint vector.

ImageBind's heads return vision as a unit vector and audio as a unit vector times 20 (its logit
scale). Modes:
- `mean_l2` (default, the paper's recipe): L2-normalise each modality, average them;
- `sum_raw` (the reference system's): raw audio (x20) plus vision; audio dominates, kept only to
  compare against;
- `concat`: the two unit vectors side by side (twice the width).

A missing modality (no audio stream, no decodable frames) is left out: the fused vector is then the
other modality alone (a zero half for `concat`), and the row's flags say which one was missing.
"""

from __future__ import annotations

import numpy as np

FUSION_MODES = ("mean_l2", "sum_raw", "concat")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def fused_width(mode: str, embed_dim: int) -> int:
    return 2 * embed_dim if mode == "concat" else embed_dim


def fuse(audio: np.ndarray, vision: np.ndarray, has_audio: np.ndarray, has_vision: np.ndarray, mode: str = "mean_l2"):
    """Batch fusion. `audio`, `vision`: raw head outputs [B, D] (any values where absent).

    Returns (audio_unit, vision_unit, fused); rows with neither modality get a NaN fused vector,
    which the caller must not store.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion mode {mode!r}: {', '.join(FUSION_MODES)}")
    a_mask = np.asarray(has_audio, bool)[:, None]
    v_mask = np.asarray(has_vision, bool)[:, None]
    audio_unit = np.where(a_mask, l2_normalise(audio), 0.0).astype(np.float32)
    vision_unit = np.where(v_mask, l2_normalise(vision), 0.0).astype(np.float32)
    if mode == "concat":
        fused = np.concatenate([audio_unit, vision_unit], axis=1)
    elif mode == "sum_raw":
        fused = np.where(a_mask, audio, 0.0) + np.where(v_mask, vision, 0.0)
    else:
        count = a_mask.astype(np.float32) + v_mask.astype(np.float32)
        fused = np.divide(audio_unit + vision_unit, count, out=np.zeros_like(audio_unit), where=count > 0)
    fused = np.where(a_mask | v_mask, fused, np.nan).astype(np.float32)
    return audio_unit, vision_unit, fused
