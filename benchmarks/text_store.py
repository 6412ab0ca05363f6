"""A text-only store of dialogues with next-utterance targets, for the training and evaluation benchmarks:
real MELD lines from ../shared/meld-text when present, else the mini-MELD generator's built-in bank."""

from __future__ import annotations

from pathlib import Path

from featurestore.store import Store
from infra.config import PathsConfig, TargetsConfig


def build_text_store(root: Path, split: str, dialogues: int) -> str:
    """Write the first `dialogues` dialogues of `split` and their targets; returns where the text came from."""
    from training import build_targets

    meld_text = PathsConfig().meld_text
    if meld_text is not None and (meld_text / "train_sent_emo.csv").is_file():
        from pipelines.meld import read_split

        records = read_split(meld_text, split).records
        ids = sorted({r.dialogue_id for r in records})[:dialogues]
        records, source = [r for r in records if r.dialogue_id in set(ids)], f"MELD text ({meld_text})"
    else:
        from pipelines.synth.script import script_from_bank  # the text alone: no media tools needed

        counts = {s: (dialogues if s == split else 0) for s in ("train", "dev", "test")}
        records, source = script_from_bank(counts, seed=0), "the generator's built-in bank (no MELD text found)"
    rows = [dict(key=f"{split}/dia{r.dialogue_id}_utt{r.utterance_id}", split=split, dialogue_id=r.dialogue_id,
                 utterance_id=r.utterance_id, speaker=r.speaker, text=r.text, emotion=r.emotion, sentiment=r.sentiment)
            for r in records]  # fmt: skip
    store = Store.open(root, create=True, embedding_dim=8)
    store.write_utterances(rows)
    build_targets(store, TargetsConfig(kind="next_utterance", splits=[split]), root)
    return source
