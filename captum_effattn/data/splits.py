"""Deterministic, balanced, disjoint splits of the offline review data.

Membership and order come from SHA-256 digests of ``(source, seed, text)``, never from Python's
``hash`` or a global random state, so a split is the same on every run and machine. Each class is
ranked by digest and dealt out in a fixed order: test first, then validation, then train. Growing
the training set therefore never moves a sentence out of the held-out splits, and changing the
validation size never changes the test split.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from captum_effattn.data.movie_reviews import Review, load_reviews

SplitName = Literal["train", "validation", "test"]
SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_SEED = 0
LABELS = (0, 1)
# IMDB reviews of at least this many words reach 256 MiniLM word pieces (checked in the tests).
LONG_REVIEW_WORDS = 250
_HTML_BREAK = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


@dataclass(frozen=True)
class SplitSizes:
    """How many Rotten Tomatoes sentences each split holds (each size even: half per label).

    Attributes:
        train: sentences to fine-tune on.
        validation: held-out sentences for model selection and the accuracy test.
        test: held-out sentences for the demo and the attribution metrics.
    """

    train: int = 5000
    validation: int = 1000
    test: int = 1000

    def __post_init__(self) -> None:
        for name in SPLIT_NAMES:
            size = getattr(self, name)
            if not isinstance(size, int) or size < 0 or size % 2:
                raise ValueError(
                    f"SplitSizes.{name} must be a non-negative even int (half per label); "
                    f"got {size!r}"
                )


@dataclass(frozen=True)
class ReviewSplits:
    """Disjoint, label-balanced Rotten Tomatoes splits (sentences are unique in the source)."""

    train: list[Review]
    validation: list[Review]
    test: list[Review]

    def __getitem__(self, name: SplitName) -> list[Review]:
        if name not in SPLIT_NAMES:
            raise KeyError(f"split must be one of {SPLIT_NAMES}; got {name!r}")
        return getattr(self, name)


def _digest(source: str, seed: int, text: str) -> str:
    return hashlib.sha256(f"{source}\x00{seed}\x00{text}".encode()).hexdigest()


def _ranked_by_label(
    reviews: list[Review], seed: int, labels: tuple[int, ...] = LABELS
) -> dict[int, list[Review]]:
    """Each label's reviews in digest order: a seeded shuffle that needs no random state."""
    return {
        label: sorted(
            (review for review in reviews if review.label == label),
            key=lambda review: _digest(review.source, seed, review.text),
        )
        for label in labels
    }


def _mixed(reviews: list[Review], seed: int) -> list[Review]:
    """Interleave labels in digest order, so a prefix of a split is roughly balanced too."""
    return sorted(reviews, key=lambda review: _digest(review.source, seed, review.text))


def rotten_tomatoes_splits(
    sizes: SplitSizes | None = None, *, seed: int = DEFAULT_SEED
) -> ReviewSplits:
    """Split the 8,530 Rotten Tomatoes sentences into train, validation and test.

    Args:
        sizes: sentences per split; default 5,000 / 1,000 / 1,000. Every split holds exactly half
            positive and half negative sentences.
        seed: any int; each seed gives a different deterministic split.

    Returns:
        The three splits, each in a seeded order that mixes the labels.

    Raises:
        ValueError: if the splits together need more sentences of one label than exist.
    """
    sizes = SplitSizes() if sizes is None else sizes
    return balanced_splits(
        load_reviews("rotten_tomatoes"), sizes, seed=seed, name="Rotten Tomatoes", unit="sentences"
    )


def balanced_splits(
    reviews: list[Review],
    sizes: SplitSizes,
    *,
    seed: int = DEFAULT_SEED,
    labels: tuple[int, ...] = LABELS,
    name: str = "the data",
    unit: str = "texts",
) -> ReviewSplits:
    """Deal labelled texts into disjoint, label-balanced train / validation / test splits.

    Each label's texts are ranked by digest and dealt out test first, then validation, then
    train (see the module doc); each split holds ``size // len(labels)`` texts of every label.

    Args:
        reviews: the texts, each text once; ``label`` in ``labels``.
        sizes: texts per split.
        seed: any int; each seed gives a different deterministic split.
        labels: the label values to balance over.
        name: what the texts are, for the error message.
        unit: what one text is, for the error message.

    Returns:
        The three splits, each in a seeded order that mixes the labels.

    Raises:
        ValueError: if the splits together need more texts of one label than exist.
    """
    ranked = _ranked_by_label(reviews, seed, labels)
    per_label = {name: getattr(sizes, name) // len(labels) for name in SPLIT_NAMES}
    needed = sum(per_label.values())
    available = min(len(ranked[label]) for label in labels)
    if needed > available:
        raise ValueError(f"{sizes} needs {needed} {unit} per label; {name} has {available}")
    bounds = {}
    start = 0
    for name in ("test", "validation", "train"):  # held-out splits first: see the module doc
        bounds[name] = (start, start + per_label[name])
        start += per_label[name]
    return ReviewSplits(
        **{
            name: _mixed(
                [review for label in labels for review in ranked[label][slice(*bounds[name])]],
                seed,
            )
            for name in SPLIT_NAMES
        }
    )


def clean_imdb_text(text: str) -> str:
    """IMDB reviews carry HTML line breaks (``<br />``); replace them with spaces."""
    return " ".join(_HTML_BREAK.sub(" ", text).split())


@functools.cache
def _unique_clean_imdb() -> tuple[Review, ...]:
    """IMDB reviews with HTML breaks removed, each distinct text once (the source repeats 92)."""
    unique: dict[str, Review] = {}
    for review in load_reviews("imdb"):
        text = clean_imdb_text(review.text)
        unique.setdefault(text, Review(text=text, label=review.label, source=review.source))
    return tuple(unique.values())


def imdb_heldout(
    size: int = 100, *, seed: int = DEFAULT_SEED, min_words: int = LONG_REVIEW_WORDS
) -> list[Review]:
    """Label-balanced IMDB reviews for long-input examples (the classifier never trains on IMDB).

    Duplicated reviews in the source are kept once, and HTML line breaks are replaced by spaces
    (:func:`clean_imdb_text`).

    Args:
        size: reviews to return, even (half per label).
        seed: any int; each seed gives a different deterministic selection.
        min_words: keep only reviews with at least this many whitespace-separated words. The
            default selects reviews that fill at least 256 MiniLM word pieces, so truncating them
            to 256 tokens gives inputs of exactly that length.

    Returns:
        ``size`` cleaned reviews, in a seeded order that mixes the labels.
    """
    if not isinstance(size, int) or size < 0 or size % 2:
        raise ValueError(f"size must be a non-negative even int (half per label); got {size!r}")
    ranked = _ranked_by_label(
        [review for review in _unique_clean_imdb() if len(review.text.split()) >= min_words], seed
    )
    available = min(len(reviews) for reviews in ranked.values())
    if size // 2 > available:
        raise ValueError(
            f"asked for {size} IMDB reviews of >= {min_words} words; only {available} per label"
        )
    return _mixed([review for label in LABELS for review in ranked[label][: size // 2]], seed)


__all__ = [
    "SPLIT_NAMES",
    "ReviewSplits",
    "SplitName",
    "SplitSizes",
    "balanced_splits",
    "clean_imdb_text",
    "imdb_heldout",
    "rotten_tomatoes_splits",
]
