"""Targets: what the model learns to say next, built from the store's dialogues.

    report = build_targets(store, TargetsConfig(kind="teacher"), model_cache)

- `next_utterance`: MELD's own reply: the next other speaker's turn (see `dialogue_examples`).
- `teacher`: an empathetic reply written by a local teacher LLM (any HF causal LM folder; default the
  embedded SmolLM2 with an explicit empathetic system prompt), batched, with the teacher and its
  decoding settings recorded in `source`. Already generated rows with the same settings are skipped.
  A prompt that does not leave the reply budget (`max_new_tokens`) within `targets.max_length` (and the
  teacher's positions) loses its oldest history lines first, as in training (`fit_history`); one
  where even the last line is too long is recorded as a failure (`prompt_too_long`) and skipped.

Each example: the dialogue history up to and including the current utterance (the last line of a
speaker's turn), the next speaker (always another one), the target (their whole turn), and the key
of the current utterance (whose audio/video goes with the prompt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Iterator

import torch

from featurestore.schema import TARGETS, target_id
from featurestore.store import Store
from infra.config import TargetsConfig
from infra.models import resolve_llm
from infra.progress import progress_bar
from training.mllm import load_llm, resolve_dtype
from training.prompt import PromptTooLong, fit_history, render_prompt, stop_token_ids

log = logging.getLogger(__name__)

UTTERANCE_COLUMNS = ["key", "split", "dialogue_id", "utterance_id", "speaker", "text", "emotion", "sentiment"]


@dataclass
class TargetsReport:
    kind: str
    source: str
    written: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    failed: int = 0  # empty replies
    shortened: int = 0  # prompts that lost their oldest history lines to fit targets.max_length
    too_long: int = 0  # examples whose last line alone leaves the reply no room (recorded as failures)


def dialogue_turns(rows: list[dict]) -> list[list[dict]]:
    """A dialogue's lines (sorted by utterance id) as turns: consecutive lines of one speaker, with no
    utterance id missing between them, are one turn."""
    turns: list[list[dict]] = []
    for row in rows:
        last = turns[-1][-1] if turns else None
        if last is not None and row["speaker"] == last["speaker"] and row["utterance_id"] == last["utterance_id"] + 1:
            turns[-1].append(row)
        else:
            turns.append([row])
    return turns


def dialogue_examples(utterances: list[dict], max_history: int) -> Iterator[dict]:
    """(context -> reply) pairs within each dialogue, in dialogue order. A pair is a turn and the turn
    that directly follows it: the reply is the next *other* speaker's line(s) (a speaker's consecutive
    lines are merged into one reply), so the model always answers someone else, as the system prompt
    asks. No pair spans a missing utterance id (MELD's train split skips lines). The context is the
    history up to the turn's last line, whose clip (`key`) goes with the prompt."""
    ordered = sorted(utterances, key=lambda r: (r["split"], r["dialogue_id"], r["utterance_id"]))
    for _, group in groupby(ordered, key=lambda r: (r["split"], r["dialogue_id"])):
        rows = list(group)
        position = {id(r): i for i, r in enumerate(rows)}
        turns = dialogue_turns(rows)
        for turn, reply in zip(turns, turns[1:]):
            current, following = turn[-1], reply[0]
            if following["utterance_id"] != current["utterance_id"] + 1:
                continue
            end = position[id(current)]
            yield dict(
                key=current["key"],
                split=current["split"],
                dialogue_id=current["dialogue_id"],
                utterance_id=current["utterance_id"],
                history=[f"{r['speaker']}: {r['text']}" for r in rows[max(0, end - max_history + 1) : end + 1]],
                next_key=following["key"],
                next_speaker=following["speaker"],
                next_emotion=following["emotion"],
                next_sentiment=following["sentiment"],
                target=" ".join(r["text"].strip() for r in reply),
            )


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def clean_reply(text: str, max_sentences: int = 2) -> str:
    """The teacher's reply as one line: no 'Name:' prefix, quotes, or text after the first line."""
    text = text.strip().split("\n")[0].strip()
    text = re.sub(r"^[A-Z][\w .'-]{0,30}:\s*", "", text)  # "Rachel: ..." -> "..."
    text = text.strip().strip('"“”').strip()
    return " ".join(_SENTENCE_END.split(text)[:max_sentences]).strip()


def teacher_message(example: dict) -> str:
    speaker, last_speaker = example["next_speaker"], example["history"][-1].split(":", 1)[0]
    question = f"What does {speaker} reply to {last_speaker}? Answer with {speaker}'s words only."
    return "\n".join([*example["history"], "", question])


def teacher_source(c: TargetsConfig) -> str:
    """The teacher and its decoding settings, as recorded with each target (and compared on re-runs)."""
    settings = dict(
        teacher=c.teacher_model,
        system_prompt_sha256=hashlib.sha256(c.teacher_system_prompt.encode()).hexdigest()[:12],
        max_new_tokens=c.max_new_tokens, do_sample=c.do_sample, repetition_penalty=c.repetition_penalty,
    )  # fmt: skip
    if c.do_sample:
        settings.update(temperature=c.temperature, top_p=c.top_p, seed=c.seed)
    return json.dumps(settings, sort_keys=True)


class Teacher:
    """A local causal LM that writes empathetic replies in batches (left padding; stops on any of the
    model's stop ids: an explicit EOS alone would override the generation config's list)."""

    def __init__(self, config: TargetsConfig, model_cache: Path):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_llm(config.teacher_model, model_cache)
        self.model, self.tokenizer = load_llm(path, quantization="none", dtype=resolve_dtype("auto", self.device), device=self.device)
        self.model.eval()
        self.tokenizer.padding_side = "left"

    def prompt(self, example: dict) -> tuple[list[int], int]:
        """The example's prompt ids with the oldest history lines dropped until `max_new_tokens` of
        `max_length` (within the teacher's positions) are left for the reply, and how many were dropped.
        Raises PromptTooLong when even the last line alone leaves too little."""
        c = self.config
        positions = getattr(self.model.config, "max_position_embeddings", None) or c.max_length

        def encode(lines: list[str]) -> list[int]:
            text = render_prompt(self.tokenizer, c.teacher_system_prompt, teacher_message(dict(example, history=lines)))
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        return fit_history(example["history"], encode, min(c.max_length, positions), c.max_new_tokens)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]]) -> list[str]:
        """A reply to each prompt (token ids from `prompt`)."""
        c = self.config
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)  # left padding
        torch.manual_seed(c.seed)
        sampling = dict(do_sample=True, temperature=c.temperature, top_p=c.top_p) if c.do_sample else dict(do_sample=False)
        output = self.model.generate(
            **batch, max_new_tokens=c.max_new_tokens, repetition_penalty=c.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=stop_token_ids(self.tokenizer, self.model.generation_config),
            **sampling,
        )  # fmt: skip
        new = output[:, batch["input_ids"].shape[1] :]
        return [clean_reply(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def build_targets(store: Store, config: TargetsConfig, model_cache: Path) -> TargetsReport:
    """Write `config.kind` targets for `config.splits` into the store's `targets` table."""
    utterances = store.query(split=config.splits, columns=UTTERANCE_COLUMNS).to_pylist()
    if not utterances:
        raise ValueError(f"the store at {store.root} has no utterances in {', '.join(config.splits)}")
    examples = list(dialogue_examples(utterances, config.max_history))
    if config.limit:
        examples = [e for split in config.splits for e in [x for x in examples if x["split"] == split][: config.limit]]
    if config.kind == "next_utterance":
        rows = [dict(e, id=target_id("next_utterance", e["key"]), kind="next_utterance", source="meld") for e in examples]
        store.write_records(TARGETS, rows)
        return TargetsReport("next_utterance", "meld", written=dict(_count_splits(rows)))

    source = teacher_source(config)
    report = TargetsReport("teacher", source)
    if not config.force:
        done = store.targets("teacher", columns=["id", "source"])
        finished = {i for i, s in zip(done.column("id").to_pylist(), done.column("source").to_pylist()) if s == source}
        todo = [e for e in examples if target_id("teacher", e["key"]) not in finished]
        report.skipped = len(examples) - len(todo)
        examples = todo
    if not examples:
        return report
    teacher = Teacher(config, model_cache)  # loaded only when there is work for it
    log.info("teacher %s: %d examples to write, %d already stored", config.teacher_model, len(examples), report.skipped)
    size = config.teacher_batch_size
    with progress_bar("teacher targets", len(examples)) as advance:
        for start in range(0, len(examples), size):
            batch, prompts, too_long = [], [], []
            for e in examples[start : start + size]:
                try:
                    ids, dropped = teacher.prompt(e)
                except PromptTooLong as exc:
                    too_long.append((e["key"], "targets", "prompt_too_long", str(exc)))
                    continue
                batch.append(e)
                prompts.append(ids)
                report.shortened += dropped > 0
            replies = teacher(prompts) if prompts else []
            rows = [
                dict(e, id=target_id("teacher", e["key"]), kind="teacher", target=reply, source=source)
                for e, reply in zip(batch, replies)
                if reply
            ]
            empty = [e["key"] for e, reply in zip(batch, replies) if not reply]
            store.write_records(TARGETS, rows)  # each batch is committed: an interrupted run resumes here
            if empty or too_long:
                store.record_failures([(k, "targets", "empty_generation", source) for k in empty] + too_long)
            report.written = dict(Counter(report.written) + _count_splits(rows))
            report.failed += len(empty)
            report.too_long += len(too_long)
            advance(len(batch) + len(too_long))
    if report.shortened or report.too_long:
        log.warning("teacher prompts: %d lost their oldest history lines to fit targets.max_length %d; %d too long even "
                    "with the last line alone (recorded as prompt_too_long failures)", report.shortened, config.max_length,
                    report.too_long)  # fmt: skip
    return report


def _count_splits(rows: list[dict]) -> Counter:
    return Counter(row["split"] for row in rows)
