"""One clip through the preprocessing job's own stages, outside Ray: for `merg reply` and the explorer.

    embedder = ClipEmbedder(config.preprocess)        # loads ImageBind once
    clip = embedder("any.mp4")                        # decode -> speaker -> ImageBind -> fuse
    clip.vectors["fused_emb"], clip.speaker_box, clip.failure

The chain is the job's (`pipelines.decode.decode_clip`: its decode, speaker and crop steps in this
process, then `pipelines.job`'s `ImageBindStage` -> `fuse_batch`) on a batch of one, so a clip
embedded here gets the vectors the store would hold for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.config import PreprocessConfig
from pipelines.imagebind import checkpoint_id, resolve_size
from pipelines.decode import decode_clip
from pipelines.job import ImageBindStage, clip_row, fuse_batch, preprocess_config_hash, speaker_settings


@dataclass
class EmbeddedClip:
    path: str
    vectors: dict[str, np.ndarray]  # audio_emb / vision_emb / fused_emb, for the modalities that decoded
    has_audio: bool
    has_video: bool
    face_visible: bool | None
    speaker_box: list[float] | None  # frame-relative (x0, y0, x1, y1)
    asd_method: str | None
    asd_score: float | None
    failure: tuple[str, str, str] | None  # (stage, reason, detail), as the job records it
    encoder: str
    encoder_checkpoint: str
    fusion: str
    config_hash: str  # the job's config hash: equal to a store row's when embedded the same way


def _batch_of_one(row: dict) -> dict[str, np.ndarray]:
    return {k: (np.array([v], dtype=object) if isinstance(v, str) else np.asarray([v])) for k, v in row.items()}


class ClipEmbedder:
    """The job's decode, encoder and fusion stages for single clips (ImageBind loaded once)."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.speaker = speaker_settings(config)
        checkpoint = str(config.imagebind_checkpoint) if config.imagebind_checkpoint else None
        self.encoder_stage = ImageBindStage(checkpoint=checkpoint, size=config.imagebind_size, seed=config.seed,
                                           dtype=config.encoder_dtype)
        self.encoder = f"imagebind-{resolve_size(config.imagebind_checkpoint, config.imagebind_size)}"
        self.encoder_checkpoint = checkpoint_id(config.imagebind_checkpoint, config.seed)
        self.config_hash = preprocess_config_hash(config, self.encoder, self.encoder_checkpoint)

    def __call__(self, path: Path | str, key: str = "clip") -> EmbeddedClip:
        row = clip_row(decode_clip(key, str(path), self.speaker))
        batch = fuse_batch(self.encoder_stage(_batch_of_one(row)), self.config.fusion)
        has_audio, has_video = bool(batch["has_audio_feat"][0]), bool(batch["has_frames"][0])
        vectors = {}
        if has_audio:
            vectors["audio_emb"] = batch["audio_emb"][0]
        if has_video:
            vectors["vision_emb"] = batch["vision_emb"][0]
        if has_audio or has_video:
            vectors["fused_emb"] = batch["fused_emb"][0]
        box = np.asarray(batch["speaker_box"][0], dtype=float)
        score = float(batch["asd_score"][0])
        reason = str(batch["fail_reason"][0])
        return EmbeddedClip(
            path=str(path), vectors=vectors, has_audio=has_audio, has_video=has_video,
            face_visible=None if batch["face_visible"][0] < 0 else bool(batch["face_visible"][0]),
            speaker_box=None if np.isnan(box).any() else [round(float(v), 4) for v in box],
            asd_method=str(batch["asd_method"][0]) or None, asd_score=None if np.isnan(score) else score,
            failure=(str(batch["fail_stage"][0]), reason, str(batch["fail_detail"][0])) if reason else None,
            encoder=self.encoder, encoder_checkpoint=self.encoder_checkpoint, fusion=self.config.fusion,
            config_hash=self.config_hash,
        )  # fmt: skip
