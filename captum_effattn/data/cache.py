"""The on-disk cache of fine-tuned sentiment classifiers.

The cache lives in ``~/.cache/captum_effattn/`` unless the ``CAPTUM_EFFATTN_CACHE`` environment
variable or the ``cache_dir`` argument says otherwise. Each classifier sits in a directory named by
its key (:func:`~captum_effattn.data.recipe.sentiment_cache_key`: the config, the versions of the
libraries and assets involved, the training recipe), next to a ``metadata.json`` with its
accuracy, config, timings and versions. A classifier is written to a temporary directory and
renamed into place, so an interrupted run never leaves a partial one behind; a file lock makes
concurrent processes build a missing one only once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from captum_effattn.data.locking import exclusive
from captum_effattn.data.recipe import TrainingConfig, sentiment_cache_key
from captum_effattn.data.training import (
    SentimentClassifier,
    quiet_transformers,
    train_sentiment_classifier,
)

CACHE_ENV = "CAPTUM_EFFATTN_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/captum_effattn")
METADATA_FILE = "metadata.json"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$CAPTUM_EFFATTN_CACHE``, else
    ``~/.cache/captum_effattn``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def save_sentiment_classifier(classifier: SentimentClassifier, directory: Path) -> None:
    """Write model, tokenizer and ``metadata.json`` into ``directory`` (which must not exist),
    atomically: through a temporary sibling directory renamed into place at the end."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with quiet_transformers():
            classifier.model.save_pretrained(staging)
            classifier.tokenizer.save_pretrained(staging)
        (staging / METADATA_FILE).write_text(json.dumps(classifier.metadata, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a cache entry is readable like any other
        staging.rename(directory)  # atomic; fails if another process published first
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_sentiment_classifier(directory: Path) -> SentimentClassifier:
    """Load a classifier written by :func:`save_sentiment_classifier` (eval mode, float32)."""
    directory = Path(directory)
    metadata_path = directory / METADATA_FILE
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{directory} holds no sentiment classifier ({METADATA_FILE})")
    metadata = json.loads(metadata_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, local_files_only=True
        ).eval()
    return SentimentClassifier(
        model=model, tokenizer=tokenizer, labels=tuple(metadata["labels"]), metadata=metadata
    )


def load_sentiment_classifier(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    config: TrainingConfig | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> SentimentClassifier:
    """The MiniLM sentiment classifier fine-tuned on Rotten Tomatoes, from the cache or built now.

    Args:
        cache_dir: cache root; default ``$CAPTUM_EFFATTN_CACHE`` or ``~/.cache/captum_effattn``.
        config: what to train; default :class:`TrainingConfig` (5,000 sentences, one epoch;
            about 80% held-out accuracy).
        retrain: fine-tune again even if the cache has this classifier, and replace it.
        progress: show progress bars and accuracy while building. Whatever it says, one line on
            stderr announces a fine-tune before it starts (it takes minutes on a CPU).

    Returns:
        The classifier (model in eval mode). Its ``metadata["directory"]`` names the cache entry.
    """
    config = TrainingConfig() if config is None else config
    return load_cached_classifier(
        f"sentiment-minilm-{sentiment_cache_key(config)}",
        lambda: train_sentiment_classifier(config, progress=progress),
        cache_dir,
        retrain=retrain,
        what=fine_tuning_description(config),
    )


def load_cached_classifier(
    name: str,
    build: Callable[[], SentimentClassifier],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    retrain: bool = False,
    what: str = "MiniLM",
) -> SentimentClassifier:
    """The classifier cached under ``name``, or ``build()`` now, saved there and returned.

    Args:
        name: the cache entry's directory name (a task's name and its cache key).
        build: fine-tunes the classifier when the cache has none (or on ``retrain``).
        cache_dir: cache root; default ``$CAPTUM_EFFATTN_CACHE`` or ``~/.cache/captum_effattn``.
        retrain: build again even if the cache has this classifier, and replace it.
        what: what ``build`` fine-tunes, for the one line printed on stderr before it runs
            (a fine-tune takes minutes on a CPU; saying so beats a silent wait).

    Returns:
        The classifier (model in eval mode). Its ``metadata["directory"]`` names the cache entry.
    """
    root = resolve_cache_dir(cache_dir)
    directory = root / name
    if directory.is_dir() and not retrain:
        return _with_directory(read_sentiment_classifier(directory), directory)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / f"{directory.name}.lock"):
        if directory.is_dir() and not retrain:  # built by another process while we waited
            return _with_directory(read_sentiment_classifier(directory), directory)
        print(
            f"fine-tuning {what} (first use, minutes on a CPU; cached in {directory})",
            file=sys.stderr,
            flush=True,
        )
        classifier = build()
        if directory.is_dir():
            stale = Path(tempfile.mkdtemp(prefix=f".{directory.name}.stale.", dir=root))
            directory.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        save_sentiment_classifier(classifier, directory)
    return _with_directory(classifier, directory)


def fine_tuning_description(
    config: TrainingConfig, texts: str = "Rotten Tomatoes sentences"
) -> str:
    """``MiniLM on 5,000 Rotten Tomatoes sentences, 1 epoch``: what a fine-tune trains on."""
    epochs = f"{config.epochs} epoch{'s' if config.epochs > 1 else ''}"
    return f"MiniLM on {config.splits.train:,} {texts}, {epochs}"


def _with_directory(classifier: SentimentClassifier, directory: Path) -> SentimentClassifier:
    classifier.metadata = {**classifier.metadata, "directory": str(directory)}
    return classifier
