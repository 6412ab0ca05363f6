"""Prompts: the dialogue as a chat, a place for the soft tokens, and the reply the model learns.

    encoded = encode_example(tokenizer, history, "Rachel", "Oh, honey...", system=..., soft_tokens=1)
    encoded.input_ids    # prompt + [media]*N + target + end of turn
    encoded.labels       # -100 everywhere except target + end of turn (the loss is on the reply only)
    encoded.media_mask   # True where the projector's soft tokens replace the token embeddings

A prompt too long for `max_length` loses its oldest history lines first (`fit_history`, the one
fitting rule of training, evaluation, `merg reply` and the teacher), keeping the reply its budget.

The chat template of the model is used when it has one; the reply always ends with the template's
own end of turn (what it appends after an assistant message: `<|im_end|>` for ChatML models such as
SmolLM2, `<|eot_id|>` for LLaMA-3-Instruct, whose tokenizer's EOS may be `<|end_of_text|>`), else
with EOS, so the model learns to stop the way its template does (the reference system left it out).
Generation stops on every id in `stop_token_ids`. `reply_target_ids` is the reply as training
learns it and evaluation scores it (perplexity), one encoding for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence, Sized, TypeVar

IGNORE_INDEX = -100
MEDIA_MARKER = "<|merg_media|>"  # split point in the rendered prompt; never tokenised


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    media_mask: list[bool]
    history_dropped: int = 0  # oldest history lines left out to fit max_length

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


_REPLY_SENTINEL = "merg-reply-sentinel"


@lru_cache(maxsize=8)
def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The tokens the chat template appends after an assistant message, found by rendering one (no
    template, or one that appends nothing: the tokenizer's EOS)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_SENTINEL}]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that refuses this conversation says nothing about its end of turn
            rendered = ""
        suffix = _ids(tokenizer, rendered.rsplit(_REPLY_SENTINEL, 1)[-1].strip()) if _REPLY_SENTINEL in rendered else []
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        # up to its last special token: the whitespace or text some templates put after it is not the turn's end
        last = max((k for k, i in enumerate(suffix) if i in special), default=None)
        if last is not None:
            return tuple(suffix[: last + 1])
    return (tokenizer.eos_token_id,)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a reply: the template's end of turn, the tokenizer's EOS and the model's
    generation config's EOS list (LLaMA-3-Instruct: `<|end_of_text|>` and `<|eot_id|>`)."""
    ids = [end_of_turn_ids(tokenizer)[-1], tokenizer.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


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


class PromptTooLong(ValueError):
    """Even the last history line alone leaves the reply less than its budget."""


Encoded = TypeVar("Encoded", bound=Sized)


def fit_history(
    history: Sequence[str], encode: Callable[[list[str]], Encoded], max_length: int, reply_tokens: int
) -> tuple[Encoded, int]:
    """`encode(history[k:])` for the smallest k that leaves `reply_tokens` of `max_length` free (the
    oldest lines dropped first), and k. Raises PromptTooLong when even the last line alone does not.

    A binary search over k (a prompt never grows when a line is dropped): a few encodings even for
    a history of thousands of lines, one for a history that fits."""
    history, budget = list(history), max_length - reply_tokens
    whole = encode(history)
    if len(whole) <= budget:
        return whole, 0
    last = max(0, len(history) - 1)
    shortest = encode(history[last:])
    if len(shortest) > budget:
        raise PromptTooLong(
            f"even the last history line alone makes a {len(shortest)}-token prompt, over the {budget} tokens that "
            f"max_length {max_length} leaves after the reply's {reply_tokens}"
        )
    too_long, fits, best = 0, last, shortest  # encode(history[too_long:]) does not fit, encode(history[fits:]) does
    while fits - too_long > 1:
        middle = (too_long + fits) // 2
        encoded = encode(history[middle:])
        if len(encoded) <= budget:
            fits, best = middle, encoded
        else:
            too_long = middle
    return best, fits


def fit_prompt(
    tokenizer, history: Sequence[str], next_speaker: str, *, system: str, soft_tokens: int = 0, max_length: int,
    reply_tokens: int,
) -> EncodedExample:  # fmt: skip
    """The prompt (no labels) with the oldest history lines dropped until `reply_tokens` of `max_length`
    are left for the reply (`fit_history`); `history_dropped` says how many were."""

    def encode(lines: list[str]) -> EncodedExample:
        ids, mask = encode_prompt(tokenizer, lines, next_speaker, system=system, soft_tokens=soft_tokens)
        return EncodedExample(ids, [IGNORE_INDEX] * len(ids), mask)

    prompt, dropped = fit_history(history, encode, max_length, reply_tokens)
    prompt.history_dropped = dropped
    return prompt


def reply_target_ids(tokenizer, reply: str) -> list[int]:
    """The reply's tokens as training learns them and evaluation scores them: its text, then the chat
    template's end of turn (`<|eot_id|>` for LLaMA-3-Instruct, not its EOS `<|end_of_text|>`)."""
    return _ids(tokenizer, reply.strip()) + list(end_of_turn_ids(tokenizer))


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
    """Prompt + target + end of turn, dropping the oldest history lines (then cutting the target) to fit."""
    end = list(end_of_turn_ids(tokenizer))
    target_ids = reply_target_ids(tokenizer, target) if target is not None else []
    fit = dict(system=system, soft_tokens=soft_tokens, max_length=max_length)
    try:
        prompt = fit_prompt(tokenizer, history, next_speaker, **fit, reply_tokens=len(target_ids))
    except PromptTooLong:  # the last line alone leaves too little room: keep it, cut the target instead
        if target is None:
            raise
        prompt = fit_prompt(tokenizer, list(history)[-1:], next_speaker, **fit, reply_tokens=len(end))
        prompt.history_dropped = max(0, len(history) - 1)
    room = max_length - len(prompt)
    if len(target_ids) > room:
        target_ids = target_ids[: room - len(end)] + end
    return EncodedExample(
        input_ids=prompt.input_ids + target_ids,
        labels=prompt.labels + target_ids,
        media_mask=prompt.media_mask + [False] * len(target_ids),
        history_dropped=prompt.history_dropped,
    )
