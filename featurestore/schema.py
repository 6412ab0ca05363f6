"""The contract between the preprocessing job, the store, training and evaluation.

MELD's label vocabularies live here so that every stage agrees on names and integer ids
(`lance.torch` cannot yield strings, so training reads the ids).
"""

from __future__ import annotations

# Order fixes the integer ids; never reorder, only append (and bump SCHEMA_VERSION).
EMOTIONS: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SENTIMENTS: tuple[str, ...] = ("neutral", "positive", "negative")

EMOTION_ID = {name: i for i, name in enumerate(EMOTIONS)}
SENTIMENT_ID = {name: i for i, name in enumerate(SENTIMENTS)}

SPLITS: tuple[str, ...] = ("train", "dev", "test")


def utterance_key(split: str, dialogue_id: int, utterance_id: int) -> str:
    """The one key format used everywhere: `split/diaD_uttU` (store rows, logs, artifact names)."""
    return f"{split}/dia{dialogue_id}_utt{utterance_id}"
