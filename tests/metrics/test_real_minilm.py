"""Every method, every metric, on the fine-tuned MiniLM sentiment classifier and real reviews."""

from __future__ import annotations

import math

import pytest

from captum_effattn.metrics import (
    Comprehensiveness,
    DeletionAUC,
    Infidelity,
    InsertionAUC,
    SensitivityMax,
    Sufficiency,
    TokenGate,
    compare_methods,
    standard_methods,
)

pytestmark = pytest.mark.slow


def test_every_method_gets_a_finite_score_in_range_from_every_metric(sentiment_classifier):
    from captum_effattn.data import imdb_heldout, rotten_tomatoes_splits

    classifier = sentiment_classifier
    sentence = rotten_tomatoes_splits().test[0]
    review = imdb_heldout(2)[0]  # truncated to 48 word pieces: longer than d + 1 = 33
    gate = TokenGate(classifier.model, classifier.tokenizer)
    methods = standard_methods(gate, ig_steps=8, extended=True)
    metrics = [
        Infidelity(n_perturb_samples=3),
        SensitivityMax(n_perturb_samples=2),
        Comprehensiveness(),
        Sufficiency(),
        DeletionAUC(steps=4),
        InsertionAUC(steps=4),
    ]
    result = compare_methods(
        gate,
        [sentence.text, review.text],
        [sentence.label, review.label],
        methods,
        metrics,
        batch_size=2,
        max_length=48,
        progress=False,
    )
    assert result.methods == tuple(methods)
    assert len(result.records) == 2 * len(methods) * len(metrics)
    for record in result.records:
        info = next(m.info for m in metrics if m.info.label == record["metric"])
        low, high = info.range
        assert math.isfinite(record["value"]), record
        assert low <= record["value"] <= high, record
    # the model comes back as it was: evaluation mode, no hooks left behind
    assert not classifier.model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in classifier.model.modules())
