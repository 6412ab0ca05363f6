"""Batched reply generation and teacher-forced scoring with a `MultimodalLM`.

Prompts are built exactly as in training (`training.prompt`), left-padded for generation, right-padded
for scoring. Presets:
- `default`: greedy, up to 40 new tokens, stop at EOS;
- `reference`: the reference system's settings: greedy, 25 new tokens, first sentence only;
- `sample`: nucleus sampling (top-p 0.9, temperature 0.7), up to 40 new tokens, seeded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from evaluation.metrics.perplexity import token_nll
from training.data import Example, collate
from training.prompt import EncodedExample, encode_example, encode_prompt


@dataclass(frozen=True)
class Preset:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    first_sentence: bool = False


PRESETS = {
    "default": Preset(max_new_tokens=40),
    "reference": Preset(max_new_tokens=25, first_sentence=True),
    "sample": Preset(max_new_tokens=40, do_sample=True, temperature=0.7, top_p=0.9),
}
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)")


def first_sentence(text: str) -> str:
    text = text.strip()
    match = _SENTENCE.match(text)
    return match.group(1) if match else text


@dataclass
class Pair:
    """One evaluation pair: the prompt's parts, the gold reply, and the utterance's embedding (or None)."""

    key: str
    history: list[str]
    next_speaker: str
    reference: str
    media: np.ndarray | None


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def generate_replies(
    model, tokenizer, pairs: Sequence[Pair], preset: Preset, *, system: str, soft_tokens: int,
    batch_size: int = 16, seed: int = 0,
) -> list[str]:  # fmt: skip
    """One reply per pair, in order; batches of similar prompt length to waste little padding."""
    encoded = []
    for p in pairs:
        ids, mask = encode_prompt(tokenizer, p.history, p.next_speaker, system=system, soft_tokens=soft_tokens if p.media is not None else 0)
        encoded.append(Example(p.key, EncodedExample(ids, [-100] * len(ids), mask), p.media))
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i]))
    replies: list[str] = [""] * len(pairs)
    sampling = dict(do_sample=True, temperature=preset.temperature, top_p=preset.top_p) if preset.do_sample else dict(do_sample=False)
    for chunk in _batches(len(order), batch_size):
        indices = [order[i] for i in chunk]
        batch = _to(collate([encoded[i] for i in indices], tokenizer.pad_token_id, left_pad=True), model.device)
        batch.pop("labels")
        torch.manual_seed(seed)
        new = model.generate(
            **batch, max_new_tokens=preset.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **sampling,
        )  # fmt: skip
        for i, text in zip(indices, tokenizer.batch_decode(new, skip_special_tokens=True)):
            text = " ".join(text.split())
            replies[i] = first_sentence(text) if preset.first_sentence else text
    return replies


@torch.no_grad()
def score_references(
    model, tokenizer, pairs: Sequence[Pair], *, system: str, soft_tokens: int, max_length: int, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced summed NLL of each gold reply (+ EOS) given its full prompt, and its token count."""
    examples = [
        Example(p.key, encode_example(tokenizer, p.history, p.next_speaker, p.reference, system=system,
                                      soft_tokens=soft_tokens if p.media is not None else 0, max_length=max_length), p.media)
        for p in pairs
    ]  # fmt: skip
    return _score(model, tokenizer, examples, batch_size)


@torch.no_grad()
def score_without_context(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """NLL of each text with no prompt (BOS, else EOS, as the only context): the reference system's
    `ref_self_ppl` (on a model's own reply) and `ref_uncond_ppl` (on the gold reply)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    examples = []
    for i, text in enumerate(texts):
        ids = tokenizer(text or "", add_special_tokens=False)["input_ids"][:256]
        examples.append(Example(str(i), EncodedExample([start, *ids], [-100, *ids], [False] * (len(ids) + 1)), None))
    return _score(model, tokenizer, examples, batch_size)


def _score(model, tokenizer, examples: list[Example], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    nll, tokens = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for chunk in _batches(len(examples), batch_size):
        batch = _to(collate([examples[i] for i in chunk], tokenizer.pad_token_id), model.device)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        sums, counts = token_nll(logits, labels)
        nll[chunk.start : chunk.stop] = sums.double().cpu().numpy()
        tokens[chunk.start : chunk.stop] = counts.cpu().numpy()
    return nll, tokens
