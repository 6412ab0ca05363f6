"""Typed configuration: pydantic models, loaded from YAML, overridable from the CLI.

One `MergConfig` holds a section per job. A YAML file gives any subset of it; `--set a.b=value`
overrides any field (the value is parsed as YAML, so `--set synth.faults=true` is a bool).
Paths are resolved in one place, `PathsConfig`, so no module invents its own locations.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Section(BaseModel):
    # Unknown keys are an error: a typo in a YAML file must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _default_meld_text() -> Path | None:
    """MELD's real annotation CSVs: $MERG_MELD_TEXT, else ../shared/meld-text beside the repo."""
    if env := os.environ.get("MERG_MELD_TEXT"):
        return Path(env)
    candidate = REPO_ROOT.parent / "shared" / "meld-text"
    return candidate if candidate.is_dir() else None


def _default_model_cache() -> Path:
    if env := os.environ.get("MERG_MODEL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "merg" / "models"


class PathsConfig(_Section):
    """Where data, the store, models and runs live. Relative paths are relative to the working dir."""

    data_root: Path = Path("data")
    meld_text: Path | None = Field(default_factory=_default_meld_text)
    store: Path = Path("data/store")
    model_cache: Path = Field(default_factory=_default_model_cache)
    runs: Path = Path("runs")


class SynthConfig(_Section):
    """The mini-MELD generator (`merg data synth`)."""

    out: Path = Path("data/mini-meld")
    dialogues: int = Field(40, ge=3, description="dialogues in total, spread over train/dev/test")
    seed: int = 0
    faults: bool = False
    text_from: Path | None = Field(
        None, description="folder with MELD's *_sent_emo.csv; default paths.meld_text, else the bank"
    )
    use_bank: bool = Field(False, description="ignore real MELD text and use the built-in bank")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    min_duration: float = 0.5
    max_duration: float = 6.0
    two_face_prob: float = Field(0.5, ge=0, le=1)
    # MELD's split sizes are 1038 / 114 / 280 dialogues.
    split_fractions: dict[str, float] = {"train": 0.726, "dev": 0.080, "test": 0.194}

    @field_validator("split_fractions")
    @classmethod
    def _three_splits(cls, value: dict[str, float]) -> dict[str, float]:
        if set(value) != {"train", "dev", "test"}:
            raise ValueError("split_fractions needs exactly the keys train, dev, test")
        return value


class PreprocessConfig(_Section):
    """The preprocessing job (`merg preprocess`): MELD -> decode -> ImageBind -> fuse -> store."""

    meld_root: Path | None = Field(None, description="MELD root (CSVs + clip folders); default synth.out")
    splits: list[Literal["train", "dev", "test"]] = ["train", "dev", "test"]
    limit: int | None = Field(None, ge=1, description="first N utterances per split (smoke runs)")
    no_media: bool = Field(False, description="ingest text and labels only, no clips")
    force: bool = Field(False, description="recompute keys already stored with the same clip and config")
    ray_address: str | None = Field(None, description="existing Ray cluster, e.g. auto; default: local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance")
    encoder_gpus: float = Field(0.0, ge=0, description="GPUs per encoder actor; 0 = CPU actors")
    encoder_actors: int = Field(1, ge=1, description="encoder actors in the pool")
    batch_size: int = Field(8, ge=1, description="clips per encoder call")
    write_batch: int = Field(64, ge=1, description="rows per store commit")
    imagebind_checkpoint: Path | None = Field(None, description="imagebind_huge.pth; default: small random-init")
    imagebind_size: Literal["small", "huge"] | None = None
    fusion: Literal["mean_l2", "sum_raw", "concat"] = "mean_l2"
    asd_method: Literal["sync", "talknet", "none"] = Field("sync", description="speaker detection; none: centre crop")
    talknet_checkpoint: Path | None = Field(None, description="pretrain_TalkSet.model, for asd_method talknet")
    s3fd_checkpoint: Path | None = Field(None, description="sfd_face.pth: faces by S3FD instead of Haar cascades")
    asd_gpus: float = Field(0.0, ge=0, description="GPUs per decode task, for TalkNet / S3FD on a GPU")
    asd_threshold: float = Field(0.3, description="sync score below which no speaker is visible")
    detect_every: int = Field(5, ge=1, description="detect faces on every k-th frame (25 fps)")
    crop_margin: float = Field(1.4, ge=1.0, description="face crop side / face box side")
    save_crops: Path | None = Field(None, description="write each speaker's face track as an mp4 here")
    seed: int = 0


    @model_validator(mode="after")
    def _talknet_needs_weights(self) -> "PreprocessConfig":
        # a random-init TalkNet must never choose a speaker
        if self.asd_method == "talknet" and self.talknet_checkpoint is None:
            raise ValueError("asd_method talknet needs talknet_checkpoint (pretrain_TalkSet.model); without it use sync")
        return self


class MergConfig(_Section):
    paths: PathsConfig = Field(default_factory=PathsConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)

    def fingerprint(self) -> str:
        """Short hash of the full config, recorded in every artifact's provenance."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> MergConfig:
    """Build the config from an optional YAML file plus `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections")
    return MergConfig.model_validate(apply_overrides(data, overrides or []))
