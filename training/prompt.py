"""Prompts: the dialogue as a chat, a place for the soft tokens, and the reply the model learns.

    encoded = encode_example(tokenizer, history, "Rachel", "Oh, honey...", system=..., soft_tokens=1)
    encoded.input_ids    # prompt + [media]*N + target + EOS
    encoded.labels       # -100 everywhere except target + EOS (the loss is on the reply only)
    encoded.media_mask   # True where the projector's soft tokens replace the token embeddings

The chat template of the model is used when it has one; the reply always ends with EOS, so the
model learns to stop (the reference system left it out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IGNORE_INDEX = -100
MEDIA_MARKER = "<|merg_media|>"  # split point in the rendered prompt; never tokenised


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    media_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


def user_message(history: Sequence[str], next_speaker: str, with_media: bool) -> str:
    lines = ["Dialogue:", *history]
    if with_media:
        lines.append(f"How the last line sounded and looked: {MEDIA_MARKER}")
    lines.append(f"Reply as {next_speaker}.")
    return "\n".join(lines)


def render_prompt(tokenizer, system: str, user: str) -> str:
    """The prompt up to where the assistant's reply begins, as text."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (some Mistral versions) raise: fold it in
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    return f"{bos}System: {system}\n\nUser: {user}\n\nAssistant: "


def _ids(tokenizer, text: str) -> list[int]:
    # the rendered template already holds its special tokens (BOS etc.): add none
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_prompt(
    tokenizer, history: Sequence[str], next_speaker: str, *, system: str, soft_tokens: int = 0
) -> tuple[list[int], list[bool]]:
    """Prompt token ids with `soft_tokens` placeholder positions, and the mask marking them."""
    text = render_prompt(tokenizer, system, user_message(history, next_speaker, soft_tokens > 0))
    ids: list[int] = []
    mask: list[bool] = []
    parts = text.split(MEDIA_MARKER)
    placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i, part in enumerate(parts):
        if i:
            ids += [placeholder] * soft_tokens
            mask += [True] * soft_tokens
        part_ids = _ids(tokenizer, part)
        ids += part_ids
        mask += [False] * len(part_ids)
    return ids, mask


def encode_example(
    tokenizer,
    history: Sequence[str],
    next_speaker: str,
    target: str | None,
    *,
    system: str,
    soft_tokens: int = 0,
    max_length: int = 384,
) -> EncodedExample:
    """Prompt + target + EOS, dropping the oldest history lines (then cutting the target) to fit."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    history = list(history)
    target_ids = _ids(tokenizer, target.strip()) + [tokenizer.eos_token_id] if target is not None else []
    while True:
        prompt_ids, mask = encode_prompt(tokenizer, history, next_speaker, system=system, soft_tokens=soft_tokens)
        if len(prompt_ids) + len(target_ids) <= max_length or len(history) <= 1:
            break
        history.pop(0)
    room = max_length - len(prompt_ids)
    if room < 1 and target is not None:
        raise ValueError(f"max_length {max_length} leaves no room for the reply after a {len(prompt_ids)}-token prompt")
    if len(target_ids) > room:
        target_ids = target_ids[: room - 1] + [tokenizer.eos_token_id]
    return EncodedExample(
        input_ids=prompt_ids + target_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids,
        media_mask=mask + [False] * len(target_ids),
    )
