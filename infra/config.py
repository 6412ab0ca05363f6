"""Typed configuration: pydantic models, loaded from YAML, overridable from the CLI.

One `MergConfig` holds a section per job. A YAML file gives any subset of it; `--set a.b=value`
overrides any field (the value is parsed as YAML, so `--set synth.faults=true` is a bool).
Paths are resolved in one place, `PathsConfig`, so no module invents its own locations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from infra.models import EMBEDDED_LLM

REPO_ROOT = Path(__file__).resolve().parent.parent


def _path_or_uri(value: Path | str) -> Path | str:
    """An object-storage URI (s3://bucket/prefix) stays a str: a Path would fold its `//`."""
    if isinstance(value, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        return value.rstrip("/")
    return Path(value)


# A local folder or an object-storage URI (featurestore.storage reads and writes both).
# validated as a str or Path first (a JSON config has only strings), then told apart
Location = Annotated[Union[str, Path], AfterValidator(_path_or_uri)]


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
    store: Location = Field(Path("data/store"), description="the feature store: a folder or s3://bucket/prefix")
    model_cache: Path = Field(default_factory=_default_model_cache)
    runs: Path = Path("runs")


class SynthConfig(_Section):
    """The mini-MELD generator (`merg data synth`)."""

    out: Location = Field(Path("data/mini-meld"), description="a folder, or s3://bucket/prefix (generated locally, then uploaded)")
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
    cut_prob: float = Field(0.0, ge=0, le=1, description="share of two-face clips with a shot / reverse-shot cut")
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

    meld_root: Location | None = Field(None, description="MELD root (CSVs + clip folders), a folder or s3://bucket/prefix; default synth.out")
    splits: list[Literal["train", "dev", "test"]] = ["train", "dev", "test"]
    limit: int | None = Field(None, ge=1, description="first N utterances per split (smoke runs)")
    no_media: bool = Field(False, description="ingest text and labels only, no clips")
    force: bool = Field(False, description="recompute keys already stored with the same clip and config")
    ray_address: str | None = Field(None, description="existing Ray cluster, e.g. auto; default: local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance")
    encoder_gpus: float = Field(0.0, ge=0, description="GPUs per encoder actor; 0 = CPU actors")
    encoder_actors: int = Field(1, ge=1, description="encoder actors in the pool")
    batch_size: int = Field(8, ge=1, description="clips per encoder call")
    decode_concurrency: int | None = Field(
        None, ge=1, description="most decode tasks at once (default: every CPU of the cluster, to keep the encoders fed)"
    )
    write_batch: int = Field(8, ge=1, description="rows per fragment a writer task writes to the store (small: rows reach the store soon)")
    commit_interval_s: float = Field(
        30.0, gt=0, description="the driver commits what the writers wrote at least this often (a kill loses at most this much finished work)"
    )
    commit_rows: int = Field(4096, ge=1, description="... and whenever this many rows wait to be committed")
    compact_every: int | None = Field(
        256, ge=1, description="merge the writers' small fragments every this many (reads stay fast during the job); null: only after it"
    )
    optimize: bool = Field(True, description="store upkeep after the job (compact, refresh indices, drop old versions)")
    imagebind_checkpoint: Path | None = Field(None, description="imagebind_huge.pth; default: small random-init")
    imagebind_size: Literal["small", "huge"] | None = None
    encoder_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="ImageBind's compute dtype; bfloat16 on a GPU: see the GPU check for speed and cosine to fp32"
    )
    fusion: Literal["mean_l2", "sum_raw", "concat"] = "mean_l2"
    asd_method: Literal["sync", "talknet", "none"] = Field("sync", description="speaker detection; none: centre crop")
    talknet_checkpoint: Path | None = Field(None, description="pretrain_TalkSet.model, for asd_method talknet")
    s3fd_checkpoint: Path | None = Field(None, description="sfd_face.pth: faces by S3FD instead of Haar cascades")
    asd_gpus: float = Field(0.0, ge=0, description="GPUs per S3FD / TalkNet actor; 0 = CPU actors")
    asd_actors: int | None = Field(
        None, ge=1, description="actors per speaker model (S3FD, TalkNet); default: 1 on GPUs, CPU actors scale from 1 to the cluster's CPUs"
    )
    asd_batch_clips: int | None = Field(
        None, ge=1, description="clips per S3FD / TalkNet actor call (frames and windows batched across them); default: 4 on GPUs, 1 on CPU"
    )
    asd_threshold: float = Field(0.5, description="sync score below which no speaker is visible (pipelines.asd.sync)")
    detect_every: int = Field(5, ge=1, description="detect faces on every k-th frame (25 fps), fast mode")
    asd_faithful: bool | None = Field(
        None, description="the TalkNet demo's way (every frame, S3FD at 0.25 of full frames); default: on with a checkpoint"
    )
    crop_margin: float = Field(1.4, ge=1.0, description="face crop side / face box side")
    save_crops: Path | None = Field(None, description="write each speaker's face track as an mp4 here")
    seed: int = 0


    @model_validator(mode="after")
    def _talknet_needs_weights(self) -> "PreprocessConfig":
        # a random-init TalkNet must never choose a speaker
        if self.asd_method == "talknet" and self.talknet_checkpoint is None:
            raise ValueError("asd_method talknet needs talknet_checkpoint (pretrain_TalkSet.model); without it use sync")
        return self


TEACHER_SYSTEM_PROMPT = (
    "You are a warm, attentive friend. Read the conversation and write the next line for the named "
    "speaker. Keep it to one or two short sentences, react to what was actually said, and show that you "
    "understand how the other person feels."
)
REPLY_SYSTEM_PROMPT = (
    "You continue a TV sitcom dialogue. Reply as the named speaker with one or two short sentences that "
    "respond with empathy to how the last speaker feels."
)



class StorageConfig(_Section):
    """Object storage (s3:// URIs for MELD and the store): a field left unset comes from the standard AWS
    variable (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). Keep secrets out of
    the repository: set them in the environment or a config file of your own."""

    endpoint: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333 (default: AWS)")
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None

    def settings(self) -> dict[str, str | None]:
        """As `featurestore.storage.S3Settings` takes them."""
        secret = self.secret_access_key.get_secret_value() if self.secret_access_key else None
        return dict(endpoint=self.endpoint, region=self.region, access_key_id=self.access_key_id, secret_access_key=secret)

    def resolved(self) -> "StorageConfig":
        """These settings completed from this process's AWS variables: for Ray tasks on other nodes,
        whose environment may not have them."""
        from featurestore import storage

        current = storage.settings().as_dict()
        return StorageConfig(**{k: v for k, v in current.items() if v is not None})

    def apply(self) -> None:
        """Make these this process's object-storage settings (`featurestore.storage`), when any is set."""
        if any(self.settings().values()):
            from featurestore import storage

            storage.configure(self.settings())


class StoreConfig(_Section):
    """Store upkeep (after a preprocessing job, and `merg store optimize`)."""

    retention_days: float = Field(
        7.0, ge=0, description="versions older than this are removed by upkeep (tagged versions are always kept)"
    )


class TargetsConfig(_Section):
    """Training/evaluation examples (`merg targets build`): what the model learns to say next."""

    kind: Literal["next_utterance", "teacher"] = "next_utterance"
    splits: list[Literal["train", "dev", "test"]] = ["train", "dev", "test"]
    max_history: int = Field(8, ge=1, description="dialogue lines kept before the reply (incl. the current one)")
    limit: int | None = Field(None, ge=1, description="first N examples per split (smoke runs)")
    teacher_model: str = Field(EMBEDDED_LLM, description="local HF folder, or the embedded model's name")
    teacher_system_prompt: str = TEACHER_SYSTEM_PROMPT
    teacher_batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(40, ge=1)
    max_length: int = Field(1024, ge=32, description="teacher prompt + reply tokens (within the teacher's positions); "
                            "the oldest history lines are dropped first")
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    repetition_penalty: float = Field(1.1, ge=1)
    force: bool = Field(False, description="regenerate teacher targets already stored with the same settings")
    seed: int = 0


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # all linear layers, as in QLoRA


class TrainConfig(_Section):
    """QLoRA training of the multimodal LLM (`merg train`)."""

    name: str = Field("smollm2-audio+video", description="run folder under paths.runs, and the store tag")
    model: str = Field(EMBEDDED_LLM, description="local HF folder, or the embedded model's name")
    modality: Literal["text", "audio", "video", "audio+video"] = "audio+video"
    target: Literal["next_utterance", "teacher"] = "next_utterance"
    system_prompt: str = REPLY_SYSTEM_PROMPT
    max_length: int = Field(384, ge=32, description="tokens per example; older history is dropped first")
    # the projector: store embedding -> `soft_tokens` vectors in the LLM's embedding space
    projector: Literal["linear", "mlp"] = "linear"
    soft_tokens: int = Field(1, ge=1)
    # QLoRA
    quantization: Literal["nf4", "none"] = "nf4"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False
    # optimisation
    batch_size: int = Field(8, ge=1, description="examples per step per process")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    projector_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int | float = Field(10, ge=0, description="steps, or a fraction of the run (0.05: its first 5%)")
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimiser steps (overrides epochs)")
    bucket_by_length: bool = True
    # validation, checkpoints, resume
    eval_every: int | float = Field(50, gt=0, description="validation loss every N steps, or every such fraction of the run (and at the end)")
    eval_limit: int | None = Field(None, ge=1, description="validate on the first N dev examples")
    patience: int | None = Field(3, ge=1, description="stop after N validations without improvement")
    save_every: int | float = Field(100, gt=0, description="resumable checkpoint every N steps, or every such fraction of the run")
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = Field(False, description="continue from the run's latest checkpoint")
    # runtime
    deepspeed_stage: Literal[0, 1, 2, 3] = 2
    deepspeed_config: Path | None = Field(None, description="default infra/deepspeed/zero<stage>.json")
    train_split: Literal["train", "dev", "test"] = "train"
    eval_split: Literal["train", "dev", "test"] = "dev"
    limit: int | None = Field(None, ge=1, description="first N training examples (smoke runs)")
    store_version: int | str | None = Field(None, description="read the store at this version or tag")
    targets_version: int | str | None = Field(
        None, description="read the targets table at this version or tag (default: store_version's tag when "
        "the targets table has it, else the latest; a numeric store_version needs it)",
    )  # fmt: skip
    log_every: int = Field(10, ge=1)
    seed: int = 0

    @field_validator("warmup_steps", "eval_every", "save_every")
    @classmethod
    def _steps_or_fraction(cls, value: int | float) -> int | float:
        """An int is steps; a float below 1 a fraction of the run (training/schedule.py); 2.0 is 2 steps."""
        if isinstance(value, float) and value >= 1:
            if not value.is_integer():
                raise ValueError(f"{value} is neither a whole number of steps nor a fraction of the run (below 1)")
            return int(value)
        return value

    @property
    def embedding_column(self) -> str | None:
        return {"text": None, "audio": "audio_emb", "video": "vision_emb", "audio+video": "fused_emb"}[self.modality]


class SystemSpec(_Section):
    """One system in an evaluation: a base model, pretrained (no run) or a trained run of it."""

    name: str
    model: str = EMBEDDED_LLM
    modality: Literal["text", "audio", "video", "audio+video"] = "text"
    run: Path | None = Field(None, description="runs/<name> of a trained run; its model and modality win")
    quantization: Literal["nf4", "none"] = "nf4"


class EvaluateConfig(_Section):
    """Evaluation (`merg evaluate`, `merg sweep`, `merg report`): a grid of systems x presets x splits."""

    sweep: str = Field("adhoc", description="name the results are stored and reported under")
    systems: list[SystemSpec] = []
    presets: list[Literal["default", "reference", "sample"]] = ["default"]
    splits: list[Literal["train", "dev", "test"]] = ["test"]
    target: Literal["next_utterance", "teacher"] = "next_utterance"
    limit: int | None = Field(None, ge=1, description="first N test pairs (smoke runs); the same N for every system")
    batch_size: int = Field(16, ge=1)
    system_prompt: str = REPLY_SYSTEM_PROMPT
    max_length: int = Field(384, ge=32)
    emotion_backend: str = Field("auto", description="auto | meld | lexicon | a local HF classifier folder")
    bertscore_model: str | None = Field(None, description="local folder (e.g. roberta-large); default embedded MiniLM")
    bertscore_layers: int | None = None
    bootstrap_samples: int = Field(1000, ge=10)
    seed: int = Field(0, description="bootstrap seed; sampling presets seed each pair from it and the pair's key")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="reply generation: HF generate in the cell's process, or vLLM (continuous batching) in its own "
        "environment (`merg models install-vllm`); scoring is HF's either way",
    )  # fmt: skip
    chunk_size: int = Field(128, ge=1, description="examples per commit of a cell's outputs: a killed cell redoes at most one chunk")
    vllm_python: Path | None = Field(None, description="the vLLM environment's python (default: the one `merg models install-vllm` made)")
    vllm_compile: bool = Field(
        False, description="vLLM with torch.compile and CUDA graphs (faster steps; minutes of start-up on CPU) instead of eager"
    )
    force: bool = Field(False, description="re-run cells already evaluated")
    ray_address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance")
    gpus_per_cell: float = Field(0.0, ge=0, description="GPUs per evaluation cell (Ray task)")
    cpus_per_cell: float = Field(1.0, gt=0)
    report_dir: Path = Path("reports")

    @field_validator("systems")
    @classmethod
    def _unique_names(cls, systems: list[SystemSpec]) -> list[SystemSpec]:
        names = [s.name for s in systems]
        if len(set(names)) != len(names):
            raise ValueError(f"system names must be unique (results are reported by name): {names}")
        return systems


class MergConfig(_Section):
    paths: PathsConfig = Field(default_factory=PathsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

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
