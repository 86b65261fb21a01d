"""A planted-token set: real neutral sentences where one planted word decides the label.

Each example is a neutral tweet (:func:`~captum_effattn.data.tweets.load_tweets`, class
``"neutral"``, 5 to 20 words, none of them a planted word) with one word of
:data:`PLANTED_WORDS` inserted at a seeded random word position. The label is a deterministic
function of the planted word, and nothing else in the text carries it, so the planted word is the
whole explanation: a faithful attribution ranks it first. Every planted word is one MiniLM word
piece. Word, position and carrier all come from SHA-256 digests of ``(seed, text)``, never from a
global random state, so the set is the same on every run and machine.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from captum_effattn.data.movie_reviews import Review
from captum_effattn.data.splits import DEFAULT_SEED, ReviewSplits, SplitSizes, balanced_splits
from captum_effattn.data.tweets import TWEET_LABELS, load_tweets

PLANTED_WORDS: dict[str, int] = {"zebra": 0, "violin": 0, "falcon": 1, "copper": 1}
"""Planted word -> label (each word one MiniLM word piece)."""
PLANTED_LABELS: tuple[str, str] = ("zebra-or-violin", "falcon-or-copper")
PLANTED_SOURCE = "planted"
PLANTED_SPLIT_SIZES = SplitSizes(train=2000, validation=200, test=400)
CARRIER_WORDS = (5, 20)
"""Carrier tweets have this many whitespace-separated words (inclusive)."""


@dataclass(frozen=True)
class PlantedText(Review):
    """A planted-token example: ``text`` is the carrier with ``word`` inserted.

    Attributes:
        word: the planted word (a key of :data:`PLANTED_WORDS`); ``label`` is its value.
        position: index of ``word`` among the text's whitespace-separated words.
    """

    word: str
    position: int


def _carriers() -> list[str]:
    neutral = TWEET_LABELS.index("neutral")
    planted = set(PLANTED_WORDS)
    low, high = CARRIER_WORDS
    return [
        tweet.text
        for tweet in load_tweets()
        if tweet.label == neutral
        and low <= len(tweet.text.split()) <= high
        and not planted & {word.strip(".,!?#@:;'\"").lower() for word in tweet.text.split()}
    ]


def plant(carrier: str, seed: int = DEFAULT_SEED) -> PlantedText:
    """Insert a planted word into ``carrier`` at a position drawn from ``(seed, carrier)``.

    Args:
        carrier: a neutral text.
        seed: any int; each seed draws a different word and position.
    """
    digest = hashlib.sha256(f"{PLANTED_SOURCE}\x00{seed}\x00{carrier}".encode()).digest()
    draw = random.Random(int.from_bytes(digest[:8], "big"))
    words = carrier.split()
    word = draw.choice(sorted(PLANTED_WORDS))
    position = draw.randint(0, len(words))
    text = " ".join([*words[:position], word, *words[position:]])
    return PlantedText(
        text=text, label=PLANTED_WORDS[word], source=PLANTED_SOURCE, word=word, position=position
    )


def planted_texts(seed: int = DEFAULT_SEED) -> list[PlantedText]:
    """Every carrier with its planted word (one example per neutral carrier tweet)."""
    return [plant(carrier, seed) for carrier in _carriers()]


def planted_splits(sizes: SplitSizes | None = None, *, seed: int = DEFAULT_SEED) -> ReviewSplits:
    """Disjoint, label-balanced train / validation / test splits of the planted-token set.

    Args:
        sizes: examples per split; default 2,000 / 200 / 400 (half per label).
        seed: any int; seeds the planted words, their positions and the split.

    Returns:
        The splits; their items are :class:`PlantedText`.
    """
    sizes = PLANTED_SPLIT_SIZES if sizes is None else sizes
    return balanced_splits(
        list(planted_texts(seed)), sizes, seed=seed, name="the planted set", unit="examples"
    )


__all__ = [
    "PLANTED_LABELS",
    "PLANTED_WORDS",
    "PlantedText",
    "plant",
    "planted_splits",
    "planted_texts",
]
