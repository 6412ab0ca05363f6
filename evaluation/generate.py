"""Batched reply generation and teacher-forced scoring with a `MultimodalLM`.

Prompts are built exactly as in training (`training.prompt`), left-padded for generation, right-padded
for scoring; a prompt that does not leave the preset's reply budget within `max_length` (and the model's
positions) loses its oldest history lines, as in training (`training.prompt.fit_history`), and the
log says how many prompts did. The gold reply is scored as training learns it: its text, then the chat
template's end of turn (`training.prompt.reply_target_ids`). Presets:
- `default`: greedy, up to 40 new tokens, stop at EOS;
- `reference`: the reference system's settings: greedy, 25 new tokens, first sentence only;
- `sample`: nucleus sampling (top-p 0.9, temperature 0.7), up to 40 new tokens, seeded per example
  (`example_seed`: the pair's key and the run's seed), so how pairs are batched or chunked does not
  change a reply.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from evaluation.metrics.perplexity import aligned_nll
from training.data import Example, collate
from training.prompt import EncodedExample, encode_example, fit_prompt, reply_target_ids, stop_token_ids

log = logging.getLogger(__name__)


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


def example_seed(seed: int, key: str) -> int:
    """One pair's sampling seed: a hash of the run's seed and the pair's key (63 bits)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def first_sentence(text: str) -> str:
    text = text.strip()
    match = _SENTENCE.match(text)
    return match.group(1) if match else text


def _reply_text(decoded: str, preset: Preset) -> str:
    text = " ".join(decoded.split())
    return first_sentence(text) if preset.first_sentence else text


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
    max_length: int | None = None, batch_size: int = 16, seed: int = 0,
) -> list[str]:  # fmt: skip
    """One reply per pair, in order; batches of similar prompt length to waste little padding. Each
    prompt is `generation_prompt` (fit to `max_length`, default the model's positions)."""
    encoded = generation_prompts(model, tokenizer, pairs, system=system, soft_tokens=soft_tokens, max_length=max_length,
                                 max_new_tokens=preset.max_new_tokens)  # fmt: skip
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i]))
    replies: list[str] = [""] * len(pairs)
    sampling = dict(do_sample=True, temperature=preset.temperature, top_p=preset.top_p) if preset.do_sample else dict(do_sample=False)
    for chunk in _batches(len(order), batch_size):
        indices = [order[i] for i in chunk]
        batch = _to(collate([encoded[i] for i in indices], tokenizer.pad_token_id, left_pad=True), model.device)
        batch.pop("labels")
        torch.manual_seed(seed)
        new = model.generate(
            **batch, max_new_tokens=preset.max_new_tokens, eos_token_id=stop_token_ids(tokenizer, getattr(model.llm, "generation_config", None)),
            pad_token_id=tokenizer.pad_token_id, **sampling,
        )  # fmt: skip
        for i, text in zip(indices, tokenizer.batch_decode(new, skip_special_tokens=True)):
            replies[i] = _reply_text(text, preset)
    return replies


@torch.no_grad()
def score_references(
    model, tokenizer, pairs: Sequence[Pair], *, system: str, soft_tokens: int, max_length: int, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced summed NLL of each gold reply (+ end of turn) given its full prompt, and its token
    count: training's encoding (`encode_example`: prompt + gold reply fit to `max_length` together)."""
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
    examples = []
    for i, text in enumerate(texts):
        ids = context_free_ids(tokenizer, text)
        examples.append(Example(str(i), EncodedExample(ids, [-100, *ids[1:]], [False] * len(ids)), None))
    return _score(model, tokenizer, examples, batch_size)


def context_free_ids(tokenizer, text: str) -> list[int]:
    """BOS (else EOS), then the text's first 256 tokens: what `score_without_context` scores from position 1."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start, *tokenizer(text or "", add_special_tokens=False)["input_ids"][:256]]


def _score(model, tokenizer, examples: list[Example], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    nll, tokens = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for chunk in _batches(len(examples), batch_size):
        batch = _to(collate([examples[i] for i in chunk], tokenizer.pad_token_id), model.device)
        out = model(**batch)  # with labels: logits only where a reply token is predicted
        sums, counts = aligned_nll(out.logits, out.targets)
        nll[chunk.start : chunk.stop] = sums.double().cpu().numpy()
        tokens[chunk.start : chunk.stop] = counts.cpu().numpy()
    return nll, tokens


def generation_prompt(tokenizer, pair: Pair, *, system: str, soft_tokens: int, max_length: int, max_new_tokens: int) -> Example:
    """The prompt a system sees: the oldest history lines dropped until it leaves `max_new_tokens` of
    `max_length` for the reply (`training.prompt.fit_prompt`, training's rule; `history_dropped` says how
    many). It never depends on the gold reply (training fits prompt + gold reply instead). Raises
    PromptTooLong when even the last line alone does not leave the reply its budget."""
    prompt = fit_prompt(tokenizer, pair.history, pair.next_speaker, system=system, max_length=max_length,
                        soft_tokens=soft_tokens if pair.media is not None else 0, reply_tokens=max_new_tokens)  # fmt: skip
    return Example(pair.key, prompt, pair.media)


def model_max_length(model, max_length: int | None) -> int:
    """`max_length`, or the model's positions where they are fewer (or `max_length` is None)."""
    positions = getattr(model.llm.config, "max_position_embeddings", None)
    limits = [n for n in (max_length, positions) if n]
    if not limits:
        raise ValueError("no max_length given and the model does not say how many positions it has")
    return min(limits)


def generation_prompts(
    model, tokenizer, pairs: Sequence[Pair], *, system: str, soft_tokens: int, max_length: int | None, max_new_tokens: int
) -> list[Example]:
    """`generation_prompt` of every pair, fit to `model_max_length`; the log says how many lost history lines."""
    limit = model_max_length(model, max_length)
    prompts = [generation_prompt(tokenizer, p, system=system, soft_tokens=soft_tokens, max_length=limit,
                                 max_new_tokens=max_new_tokens) for p in pairs]  # fmt: skip
    if shortened := sum(p.encoded.history_dropped > 0 for p in prompts):
        log.info("%d of %d prompts lost their oldest history lines to fit max_length %d with a %d-token reply budget",
                 shortened, len(prompts), limit, max_new_tokens)  # fmt: skip
    return prompts


@torch.no_grad()
def generate_and_score(
    model, tokenizer, pairs: Sequence[Pair], preset: Preset, *, system: str, soft_tokens: int, max_length: int,
    batch_size: int = 16, seed: int = 0, decode: bool = True,
) -> tuple[list[str], np.ndarray, np.ndarray]:  # fmt: skip
    """`generate_replies` and `score_references` in one pass over each prompt: the prompt is run once
    (left-padded, KV cache kept), the gold reply is scored on a copy of that cache, and the reply is
    decoded from it. The prompt dominates the cost, so this halves the work of doing both. The prompt
    is `generation_prompt` (fit without the gold reply), and the gold reply is scored whole, encoded as
    training learns it (`reply_target_ids`: text + the template's end of turn). `decode=False` scores
    only (the replies come from elsewhere, e.g. the vLLM backend; blank here)."""
    import copy

    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    embed_tokens = model.llm.get_input_embeddings()
    prompts = generation_prompts(model, tokenizer, pairs, system=system, soft_tokens=soft_tokens, max_length=max_length,
                                 max_new_tokens=preset.max_new_tokens)  # fmt: skip
    references = [reply_target_ids(tokenizer, p.reference) for p in pairs]
    warp = LogitsProcessorList([TemperatureLogitsWarper(preset.temperature), TopPLogitsWarper(preset.top_p)])
    order = sorted(range(len(pairs)), key=lambda i: len(prompts[i]))
    replies, nll, counts = [""] * len(pairs), np.zeros(len(pairs)), np.zeros(len(pairs), dtype=np.int64)
    stops = torch.tensor(stop_token_ids(tokenizer, getattr(model.llm, "generation_config", None)), device=model.device)
    for chunk in _batches(len(order), batch_size):
        indices = [order[i] for i in chunk]
        generators = [torch.Generator(device=model.device).manual_seed(example_seed(seed, pairs[i].key)) for i in indices]
        batch = _to(collate([prompts[i] for i in indices], tokenizer.pad_token_id, left_pad=True), model.device)
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded positions
        embeds = model.embed(batch["input_ids"], batch.get("media"), batch["media_mask"])
        prefill = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, next_logits, last = prefill.past_key_values, prefill.logits[:, -1].float(), positions[:, -1:]

        # the gold reply (+ end of turn), teacher-forced on a copy of the prompt's cache
        width = max(len(references[i]) for i in indices)
        ref = torch.full((len(indices), width), tokenizer.pad_token_id, dtype=torch.long, device=model.device)
        ref_mask = torch.zeros_like(ref)
        for row, i in enumerate(indices):
            ref[row, : len(references[i])] = torch.tensor(references[i])
            ref_mask[row, : len(references[i])] = 1
        scored = model.llm(
            inputs_embeds=embed_tokens(ref), attention_mask=torch.cat([mask, ref_mask], dim=1),
            position_ids=last + 1 + torch.arange(width, device=model.device), past_key_values=copy.deepcopy(cache),
        )  # fmt: skip
        logits = torch.cat([next_logits[:, None], scored.logits[:, :-1].float()], dim=1)  # position j predicts ref[:, j]
        sums, n = aligned_nll(logits, ref.masked_fill(ref_mask == 0, -100))
        nll[indices], counts[indices] = sums.double().cpu().numpy(), n.cpu().numpy()
        if not decode:
            continue

        # the reply, decoded from the prompt's cache (greedy, or top-p sampling)
        tokens, done = [], torch.zeros(len(indices), dtype=torch.bool, device=model.device)
        for step in range(preset.max_new_tokens):
            if preset.do_sample:
                probs = warp(None, next_logits).softmax(-1)
                token = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])
            else:
                token = next_logits.argmax(-1)
            token = token.masked_fill(done, tokenizer.pad_token_id)
            tokens.append(token)
            done |= torch.isin(token, stops)
            if done.all() or step == preset.max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(len(indices), 1)], dim=1)  # as generate() extends it
            last = last + 1
            out = model.llm(input_ids=token[:, None], attention_mask=mask, position_ids=last, past_key_values=cache, use_cache=True)
            cache, next_logits = out.past_key_values, out.logits[:, -1].float()
        new = torch.stack(tokens, dim=1)
        for i, text in zip(indices, tokenizer.batch_decode(new, skip_special_tokens=True)):
            replies[i] = _reply_text(text, preset)
    return replies, nll, counts
