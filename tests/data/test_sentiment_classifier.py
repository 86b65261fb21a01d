"""The full sentiment classifier (built or loaded once per session) is good enough to explain."""

from __future__ import annotations

import pytest

from captum_effattn.data.classifier import (
    TrainingConfig,
    evaluate_accuracy,
    pretrained_minilm_classifier,
    sentiment_cache_key,
)
from captum_effattn.data.splits import rotten_tomatoes_splits

pytestmark = pytest.mark.slow


def test_held_out_validation_accuracy_is_at_least_78_percent(sentiment_classifier):
    config = TrainingConfig()
    validation = rotten_tomatoes_splits(config.splits, seed=config.seed).validation
    assert len(validation) == 1000
    accuracy = evaluate_accuracy(
        sentiment_classifier.model,
        sentiment_classifier.tokenizer,
        validation,
        max_length=config.max_length,
    )
    assert accuracy >= 0.78


def test_it_is_the_default_classifier_in_eval_mode(sentiment_classifier):
    assert sentiment_classifier.metadata["cache_key"] == sentiment_cache_key(TrainingConfig())
    assert sentiment_classifier.labels == ("negative", "positive")
    assert not sentiment_classifier.model.training
    default_attention = pretrained_minilm_classifier()[0].config._attn_implementation
    assert sentiment_classifier.model.config._attn_implementation == default_attention


def test_the_command_line_prints_the_held_out_accuracy(sentiment_classifier, capsys):
    from captum_effattn.data.classifier import main

    assert main(["--quiet"]) == 0
    out = capsys.readouterr().out
    after = sentiment_classifier.metadata["accuracy"]["after"]
    assert f"after {after['validation']:.4f}  (1000 sentences)" in out
    assert sentiment_classifier.metadata["directory"] in out
