"""The sentiment classifier's public face and command line.

:func:`load_sentiment_classifier` returns the cached classifier (:mod:`~captum_effattn.data.cache`),
fine-tuning it first (:mod:`~captum_effattn.data.training`) when the cache has none for the
requested :class:`TrainingConfig` (:mod:`~captum_effattn.data.recipe`).

Run ``python -m captum_effattn.data.classifier`` to build (or load) it and print its accuracy.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from captum_effattn.data.cache import (
    CACHE_ENV,
    DEFAULT_CACHE_DIR,
    METADATA_FILE,
    load_sentiment_classifier,
    read_sentiment_classifier,
    resolve_cache_dir,
    save_sentiment_classifier,
)
from captum_effattn.data.recipe import (
    KEYED_DISTRIBUTIONS,
    LABELS,
    RECIPE_VERSION,
    TrainingConfig,
    library_versions,
    sentiment_cache_key,
)
from captum_effattn.data.training import (
    EVAL_BATCH_SIZE,
    SentimentClassifier,
    accuracy_table,
    classifier_logits,
    evaluate_accuracy,
    fine_tune,
    pretrained_minilm_classifier,
    train_sentiment_classifier,
)

__all__ = [
    "CACHE_ENV",
    "DEFAULT_CACHE_DIR",
    "EVAL_BATCH_SIZE",
    "KEYED_DISTRIBUTIONS",
    "LABELS",
    "METADATA_FILE",
    "RECIPE_VERSION",
    "SentimentClassifier",
    "TrainingConfig",
    "classifier_logits",
    "evaluate_accuracy",
    "fine_tune",
    "library_versions",
    "load_sentiment_classifier",
    "main",
    "pretrained_minilm_classifier",
    "read_sentiment_classifier",
    "resolve_cache_dir",
    "save_sentiment_classifier",
    "sentiment_cache_key",
    "train_sentiment_classifier",
]


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
    print(accuracy_table(classifier.metadata))
    print(f"  cached in {classifier.metadata['directory']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
