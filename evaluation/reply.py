"""`merg reply`: one clip and a dialogue in, a trained run's reply out.

    replier = Replier("runs/smollm2-audio+video")             # loads the run (and ImageBind on first clip)
    result = replier(["Rachel: I got the job!", "Ross: You did?"], clip="any.mp4", speaker="Rachel")
    result.reply, result.to_dict()

The clip goes through the preprocessing job's own stages (`pipelines.one_clip`: decode -> speaker ->
ImageBind -> fuse) with the encoder settings of the store the run was trained on (read from that
store's rows), then the run's projector and LLM generate as `merg evaluate` does. A clip that does
not give the run its modality is an error, unless the caller allows a text-only answer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.generate import PRESETS, Pair, generate_replies, generation_prompt, model_max_length
from featurestore.store import Store, StoreError
from infra.config import PreprocessConfig
from training.prompt import PromptTooLong

log = logging.getLogger(__name__)

# the clip modalities a run's embedding column needs
NEEDS = {"audio_emb": ("audio",), "vision_emb": ("video",), "fused_emb": ("audio", "video")}


class ReplyError(ValueError):
    """A reply that cannot be given as asked, with the reason in one line."""


@dataclass
class ReplyResult:
    reply: str
    run: str
    modality: str  # the run's
    used: str  # what the prompt carried: the run's embedding column, or "text"
    next_speaker: str
    history: list[str]
    clip: str | None = None
    modalities: dict[str, bool] = field(default_factory=dict)  # audio / video decoded from the clip
    speaker_box: list[float] | None = None
    asd_method: str | None = None
    asd_score: float | None = None
    face_visible: bool | None = None
    encoder: str | None = None
    encoder_checkpoint: str | None = None
    fusion: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def parse_history(text: str) -> list[str]:
    """Lines `Speaker: text`, separated by newlines (or a literal backslash-n, as shells pass it)."""
    lines = [line.strip() for line in text.replace("\\n", "\n").splitlines() if line.strip()]
    if not lines:
        raise ReplyError("the history is empty: give at least one line, e.g. --history 'Rachel: I got the job!'")
    return lines


def check_clip(clip: Path | str) -> None:
    """A ReplyError naming what is wrong when `clip` is not a readable file (gone, a folder, a dangling link...)."""
    from pipelines.media import check_clip_path

    problem = check_clip_path(clip)
    if problem is not None:
        reason, detail = problem
        raise ReplyError(f"no clip at {clip}: no such file" if reason == "missing_file" else f"the clip {detail} ({reason}): give the .mp4 file itself")


def default_next_speaker(history: Sequence[str]) -> str:
    """The latest speaker other than the last line's (a reply goes back to them), else 'Friend'."""
    speakers = [line.split(":", 1)[0].strip() for line in history if ":" in line]
    last = speakers[-1] if speakers else None
    return next((s for s in reversed(speakers) if s != last), "Friend")


def store_encoder_settings(store_root: Path | str, column: str) -> dict | None:
    """Encoder, weights, fusion and config hash of the rows in the run's store that hold `column`."""
    try:
        store = Store.open(store_root)
    except (StoreError, FileNotFoundError):
        return None
    rows = store.query(where=f"{column} IS NOT NULL", columns=["encoder", "encoder_checkpoint", "fusion", "config_hash"], limit=1)
    return rows.to_pylist()[0] if rows.num_rows else None


def preprocess_for_run(base: PreprocessConfig, settings: dict | None) -> PreprocessConfig:
    """`base` with the encoder size, seed and fusion the run's store was embedded with."""
    if not settings or not settings.get("encoder"):
        return base
    update: dict = {"fusion": settings["fusion"] or base.fusion}
    size = settings["encoder"].removeprefix("imagebind-")
    if size in ("small", "huge"):
        update["imagebind_size"] = size
    weights = settings["encoder_checkpoint"] or ""
    if weights.startswith("random-init:"):
        update.update(imagebind_checkpoint=None, seed=int(weights.split(":", 1)[1]))
    elif base.imagebind_checkpoint is None:
        raise ReplyError(
            f"the run's store was embedded with ImageBind weights sha256 {weights[:12]}...: "
            "pass --imagebind-checkpoint (the same imagebind_huge.pth)"
        )
    return base.model_copy(update=update)


class Replier:
    """A loaded run that answers one dialogue (and clip) at a time; ImageBind is loaded on first clip."""

    def __init__(self, run: Path | str, *, preprocess: PreprocessConfig | None = None, preset: str = "default", device=None):
        from training import load_run

        if preset not in PRESETS:
            raise ReplyError(f"unknown preset {preset!r}: {', '.join(PRESETS)}")
        self.run = Path(run)
        try:
            self.model, self.tokenizer, self.info = load_run(self.run, device=device)
        except FileNotFoundError as exc:
            raise ReplyError(str(exc)) from exc
        self.preset = PRESETS[preset]
        self.base_preprocess = preprocess or PreprocessConfig()
        self._embedder = None
        self._store_settings: dict | None = None
        self.setup_notes: list[str] = []  # said with every reply that used the clip encoder

    @property
    def column(self) -> str | None:
        return self.info.embedding_column if self.info.modality != "text" else None

    def embedder(self):
        """The job's clip stages with the encoder settings of the run's store (built once)."""
        if self._embedder is None:
            from pipelines.one_clip import ClipEmbedder

            self._store_settings = store_encoder_settings(self.info.store, self.column) if self.info.store else None
            if self._store_settings is None:
                self.setup_notes.append(f"the run's store ({self.info.store}) is not readable here: the clip is embedded with the config's encoder settings")
            self._embedder = ClipEmbedder(preprocess_for_run(self.base_preprocess, self._store_settings))
        return self._embedder

    def __call__(
        self, history: Sequence[str], clip: Path | str | None = None, speaker: str | None = None, *,
        allow_text_only: bool = False,
    ) -> ReplyResult:  # fmt: skip
        history = list(history)
        if not history:
            raise ReplyError("the history is empty: give at least one line, e.g. 'Rachel: I got the job!'")
        result = ReplyResult(
            reply="", run=str(self.run), modality=self.info.modality, used="text",
            next_speaker=speaker or default_next_speaker(history), history=history,
            clip=str(clip) if clip is not None else None,
        )  # fmt: skip
        media = self._media(clip, result, allow_text_only) if self.column else None
        if self.column is None and clip is not None:
            result.notes.append("text-only run: the clip was not used")
        pair = Pair("reply", history, result.next_speaker, "", media)
        max_length = self._fit_note(pair, result)
        result.reply = generate_replies(
            self.model, self.tokenizer, [pair], self.preset, system=self.info.system_prompt,
            soft_tokens=self.info.soft_tokens, max_length=max_length, batch_size=1,
        )[0]  # fmt: skip
        return result

    def _fit_note(self, pair: Pair, result: ReplyResult) -> int:
        """The run's max_length (within the model's positions) the prompt is fit to, as training fit it:
        a note when the oldest history lines were dropped, a ReplyError when even the last one is too long."""
        max_length = model_max_length(self.model, self.info.max_length)
        try:
            prompt = generation_prompt(self.tokenizer, pair, system=self.info.system_prompt, soft_tokens=self.info.soft_tokens,
                                       max_length=max_length, max_new_tokens=self.preset.max_new_tokens)  # fmt: skip
        except PromptTooLong as exc:
            raise ReplyError(f"the dialogue does not fit the run: {exc}; shorten the last line") from exc
        if dropped := prompt.encoded.history_dropped:
            result.notes.append(
                f"the oldest {dropped} of {len(pair.history)} history lines were left out: the run's prompts fit "
                f"max_length {max_length} with {self.preset.max_new_tokens} tokens kept for the reply"
            )  # fmt: skip
        return max_length

    def _media(self, clip: Path | str | None, result: ReplyResult, allow_text_only: bool) -> np.ndarray | None:
        """The run's embedding of `clip`, or None (text only) where allowed; fills in what was used."""
        column = self.column

        def fallback(reason: str) -> None:
            if not allow_text_only:
                raise ReplyError(f"{reason}; the run {self.run.name} is {self.info.modality} (--allow-text-only answers from the text alone)")
            result.notes.append(f"text only: {reason}")

        if clip is None:
            fallback("no clip given")
            return None
        check_clip(clip)
        embedded = self.embedder()(clip)
        result.notes.extend(self.setup_notes)
        result.modalities = {"audio": embedded.has_audio, "video": embedded.has_video}
        result.speaker_box, result.asd_method, result.asd_score = embedded.speaker_box, embedded.asd_method, embedded.asd_score
        result.face_visible = embedded.face_visible
        result.encoder, result.encoder_checkpoint, result.fusion = embedded.encoder, embedded.encoder_checkpoint, embedded.fusion
        if embedded.failure:
            stage, reason, detail = embedded.failure
            result.notes.append(f"clip: {stage} {reason}" + (f" ({detail})" if detail else ""))
        missing = [m for m in NEEDS[column] if not result.modalities[m]]
        if column == "fused_emb" and len(missing) < 2:
            missing = []  # fusion uses whichever modality decoded, as the job does
        if missing:
            why = embedded.failure[1] if embedded.failure else "not decoded"
            fallback(f"the clip gave no {' or '.join(missing)} ({why})")
            return None
        stored = (self._store_settings or {}).get("config_hash")
        if stored and stored != embedded.config_hash:
            result.notes.append(f"the clip was embedded with settings other than the run's store ({embedded.config_hash} vs {stored})")
        vector = embedded.vectors[column]
        expected = (self.info.projector or {}).get("in_dim", len(vector))
        if len(vector) != expected:
            raise ReplyError(f"the clip's {column} is {len(vector)}-d but the run's projector takes {expected}-d (another encoder?)")
        result.used = column
        return vector.astype(np.float32)


def reply(
    run: Path | str, history: Sequence[str] | str, clip: Path | str | None = None, speaker: str | None = None, *,
    allow_text_only: bool = False, preprocess: PreprocessConfig | None = None, preset: str = "default",
) -> ReplyResult:  # fmt: skip
    """One reply from a trained run (see `Replier`); a bad clip path is refused before the run loads."""
    lines = parse_history(history) if isinstance(history, str) else list(history)
    if clip is not None:
        check_clip(clip)
    return Replier(run, preprocess=preprocess, preset=preset)(lines, clip, speaker, allow_text_only=allow_text_only)
