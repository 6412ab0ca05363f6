"""What the mini-MELD says: whole dialogues with speakers, lines and labels, as MELD records.

From MELD's real annotation CSVs (a seeded sample of whole dialogues per split, keeping their real
ids, times and labels), or, without them, from the small bank in `bank.yaml` with labels drawn
from MELD's label distribution.
"""

from __future__ import annotations

import random
from collections import defaultdict
from importlib import resources
from pathlib import Path

import yaml

from featurestore.schema import SPLITS
from pipelines.meld import Utterance, read_split

# MELD's emotion distribution over all 13,708 utterances (neutral ≈ 47%).
MELD_EMOTION_WEIGHTS = {
    "neutral": 0.472, "joy": 0.174, "surprise": 0.121, "anger": 0.111,
    "sadness": 0.072, "disgust": 0.027, "fear": 0.027,
}  # fmt: skip
_BANK_SPEAKERS = ("Rachel", "Ross", "Monica", "Chandler", "Joey", "Phoebe")
_SENTIMENT_OF = {"neutral": "neutral", "joy": "positive", "anger": "negative", "sadness": "negative",
                 "disgust": "negative", "fear": "negative"}  # fmt: skip


def dialogues_per_split(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Split `total` dialogues by `fractions`, at least one per split, summing to `total`."""
    counts = {s: max(1, int(round(total * fractions[s]))) for s in SPLITS}
    while sum(counts.values()) > total:
        largest = max(counts, key=counts.get)
        counts[largest] -= 1
    counts["train"] += total - sum(counts.values())
    return counts


def script_from_meld_text(text_dir: Path, counts: dict[str, int], seed: int) -> list[Utterance]:
    """A seeded sample of whole real MELD dialogues per split, ids and labels kept."""
    lines: list[Utterance] = []
    for split in SPLITS:
        by_dialogue: dict[int, list[Utterance]] = defaultdict(list)
        for record in read_split(text_dir, split).records:
            by_dialogue[record.dialogue_id].append(record)
        chosen = random.Random(f"{seed}/{split}").sample(sorted(by_dialogue), min(counts[split], len(by_dialogue)))
        for dialogue_id in sorted(chosen):
            turns = sorted(by_dialogue[dialogue_id], key=lambda r: r.utterance_id)
            lines.extend(turns)
    return lines


def _timestamp(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def load_bank() -> dict[str, list[str]]:
    return yaml.safe_load(resources.files("pipelines.synth").joinpath("bank.yaml").read_text("utf-8"))


def script_from_bank(counts: dict[str, int], seed: int) -> list[Utterance]:
    """Dialogues of 3-8 turns among 2-3 speakers, lines from the bank, labels MELD-distributed."""
    bank = load_bank()
    emotions, weights = zip(*MELD_EMOTION_WEIGHTS.items())
    lines: list[Utterance] = []
    for split in SPLITS:
        rng = random.Random(f"{seed}/bank/{split}")
        for dialogue_id in range(counts[split]):
            cast = rng.sample(_BANK_SPEAKERS, rng.choice((2, 2, 3)))
            season, episode, clock = rng.randint(1, 10), rng.randint(1, 24), rng.uniform(30, 1200)
            for utterance_id in range(rng.randint(3, 8)):
                emotion = rng.choices(emotions, weights)[0]
                sentiment = _SENTIMENT_OF.get(emotion) or rng.choice(("positive", "negative"))
                start, clock = clock, clock + rng.uniform(1.0, 4.0)
                lines.append(
                    Utterance(split, dialogue_id, utterance_id, cast[utterance_id % len(cast)],
                              rng.choice(bank[emotion]), emotion, sentiment, season, episode,
                              _timestamp(start), _timestamp(clock), clip_path=None, clip_status="no_media")
                )  # fmt: skip
    return lines


