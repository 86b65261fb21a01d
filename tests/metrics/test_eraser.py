"""ERASER comprehensiveness / sufficiency and deletion / insertion curves against hand computations
on a model whose output is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from captum_effattn.metrics import (
    Comprehensiveness,
    DeletionAUC,
    InsertionAUC,
    MetricContext,
    Sufficiency,
    gated_inputs,
)
from captum_effattn.metrics.eraser import (
    erasure_curve,
    perturbation_curve,
    target_probability,
    top_token_counts,
    top_token_masks,
)
from tests.metrics.analytic import LinearGate

S = 10
WEIGHTS = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 1.0, 0.75, -2.0])


def context(attributions, weights=WEIGHTS, special=None, target=1):
    ids = torch.arange(S)[None]
    special_mask = None if special is None else special[None]
    inputs = gated_inputs(ids, torch.ones_like(ids), special_mask)
    return MetricContext(
        forward_func=LinearGate(weights),
        inputs=inputs,
        target=torch.tensor([target]),
        attributions=attributions[None],
        explain=lambda *a, **k: None,
    )


def gate_without(indices):
    gate = torch.ones(S)
    gate[list(indices)] = 0
    return gate


def test_comprehensiveness_equals_the_hand_computation():
    model = LinearGate(WEIGHTS)
    oracle = WEIGHTS.clone()  # ranks 2, 4, 7, 8, 0, 6, 3, 5, 1, 9
    # bins 10% and 50% of 10 tokens: the top 1 and the top 5
    full = model.p1(torch.ones(S))
    expected = (
        (full - model.p1(gate_without([2]))) + (full - model.p1(gate_without([2, 4, 7, 8, 0])))
    ) / 2
    value = Comprehensiveness(bins=(0.1, 0.5))(context(oracle))
    assert value.shape == (1,)
    assert value.dtype == torch.float64
    assert float(value[0]) == pytest.approx(expected, abs=1e-12)


def test_sufficiency_equals_the_hand_computation():
    model = LinearGate(WEIGHTS)
    full = model.p1(torch.ones(S))
    only_top_1 = model.p1(torch.ones(S) - gate_without([2]))
    only_top_5 = model.p1(torch.ones(S) - gate_without([2, 4, 7, 8, 0]))
    expected = ((full - only_top_1) + (full - only_top_5)) / 2
    value = Sufficiency(bins=(0.1, 0.5))(context(WEIGHTS.clone()))
    assert float(value[0]) == pytest.approx(expected, abs=1e-12)


def test_eraser_bins_round_up_to_at_least_one_token():
    # 1% and 5% of 10 tokens are 0.1 and 0.5 tokens: ERASER still removes one.
    counts = top_token_counts(torch.ones(1, S, dtype=torch.bool), (0.01, 0.05, 0.1, 0.2, 0.5), True)
    assert counts[:, 0].tolist() == [1, 1, 1, 2, 5]
    # 0.1 * 30 = 3.0000000000000004 in floating point: still 3 tokens, not 4
    assert top_token_counts(torch.ones(1, 30, dtype=torch.bool), (0.1,), True).item() == 3
    # never more than the removable tokens, and nothing at fraction 0 for the curves
    few = torch.tensor([[True, True, False]])
    assert top_token_counts(few, (0.0, 1.0), False)[:, 0].tolist() == [0, 2]


def test_ties_go_to_the_earlier_token_and_special_tokens_are_never_picked():
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0, 9.0]])
    removable = torch.tensor([[False, True, True, True, True]])
    masks = top_token_masks(scores, removable, torch.tensor([[2], [3]]))
    assert masks[0, 0].tolist() == [False, True, False, False, True]
    assert masks[1, 0].tolist() == [False, True, True, False, True]


def test_special_tokens_are_kept_by_every_erasure():
    # The model reads only token 0, a special token: nothing the metrics do may change it.
    weights = torch.zeros(S)
    weights[0] = 3.0
    special = torch.zeros(S, dtype=torch.long)
    special[0] = 1
    scores = torch.linspace(1, 0, S)  # the special token scores highest
    ctx = context(scores, weights=weights, special=special)
    for metric in (Comprehensiveness(), Sufficiency(), DeletionAUC(), InsertionAUC()):
        value = float(metric(ctx)[0])
        expected = 0.0 if metric.info.name in ("comprehensiveness", "sufficiency") else None
        if expected is None:  # a flat curve at p(full) = sigmoid(3)
            assert value == pytest.approx(1 / (1 + math.exp(-3)), abs=1e-12)
        else:
            assert value == pytest.approx(0.0, abs=1e-12)


def test_deletion_and_insertion_curves_equal_the_hand_computation():
    model = LinearGate(WEIGHTS)
    order = [2, 4, 7, 8, 0, 6, 3, 5, 1, 9]  # by attribution, highest first
    ctx = context(WEIGHTS.clone())
    inputs = ctx.inputs
    fractions, deletion = perturbation_curve(
        ctx.forward_func, inputs.gate, ctx.attributions, inputs.removable, ctx.target, steps=2
    )
    assert fractions.tolist() == [0.0, 0.5, 1.0]
    expected = [model.p1(gate_without(order[:k])) for k in (0, 5, 10)]
    torch.testing.assert_close(deletion[0], torch.tensor(expected, dtype=torch.float64))
    auc = float(DeletionAUC(steps=2)(ctx)[0])
    assert auc == pytest.approx(0.25 * (expected[0] + 2 * expected[1] + expected[2]), abs=1e-12)

    _, insertion = perturbation_curve(
        ctx.forward_func,
        inputs.gate,
        ctx.attributions,
        inputs.removable,
        ctx.target,
        steps=2,
        insertion=True,
    )
    inserted = [model.p1(torch.ones(S) - gate_without(order[:k])) for k in (0, 5, 10)]
    torch.testing.assert_close(insertion[0], torch.tensor(inserted, dtype=torch.float64))
    auc = float(InsertionAUC(steps=2)(ctx)[0])
    assert auc == pytest.approx(0.25 * (inserted[0] + 2 * inserted[1] + inserted[2]), abs=1e-12)


def test_the_oracle_ranking_is_the_best_on_a_monotone_model():
    """With positive weights, ranking by weight removes probability fastest: the oracle gets the
    highest comprehensiveness and lowest deletion AUC of all rankings tried."""
    weights = torch.rand(S, generator=torch.Generator().manual_seed(0)) + 0.1
    oracle = context(weights.clone(), weights=weights)
    comprehensiveness = Comprehensiveness()(oracle)
    deletion = DeletionAUC()(oracle)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        other = context(torch.rand(S, generator=generator), weights=weights)
        assert Comprehensiveness()(other) <= comprehensiveness + 1e-12
        assert DeletionAUC()(other) >= deletion - 1e-12


def test_curves_batch_examples_without_mixing_them():
    model = LinearGate(WEIGHTS)
    ids = torch.arange(S).repeat(3, 1)
    inputs = gated_inputs(ids)
    scores = torch.stack([WEIGHTS, -WEIGHTS, torch.arange(S).double()]).float()
    target = torch.tensor([1, 0, 1])
    batched = erasure_curve(model, inputs.gate, scores, inputs.removable, target, (ids, ids))
    for i in range(3):
        alone = erasure_curve(
            model, inputs.gate[i : i + 1], scores[i : i + 1], inputs.removable[i : i + 1],
            target[i : i + 1], (ids[i : i + 1], ids[i : i + 1]), max_examples_per_batch=2,
        )  # fmt: skip
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-15)


def test_a_missing_target_for_a_multi_class_output_is_an_error():
    with pytest.raises(ValueError, match="returns 2 classes per example: pass target"):
        target_probability(torch.zeros(3, 2), None)
    with pytest.raises(ValueError, match=r"target \[0, 5\] out of range for 2 classes"):
        target_probability(torch.zeros(2, 2), torch.tensor([0, 5]))
    # a single logit needs no target: sigmoid
    assert target_probability(torch.zeros(2, 1), None).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("bins", [(), (0.0, 0.5), (0.5, 1.5), (-0.1,)])
def test_bins_must_be_fractions(bins):
    with pytest.raises(ValueError, match=r"bins must be fractions in \(0, 1\]"):
        Comprehensiveness(bins=bins)
    with pytest.raises(ValueError, match=r"bins must be fractions in \(0, 1\]"):
        erasure_curve(None, torch.ones(1, S), torch.ones(1, S), torch.ones(1, S).bool(), None,
                      bins=bins)  # fmt: skip


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps must be at least 1; got 0"):
        DeletionAUC(steps=0)


def test_attributions_of_the_wrong_shape_are_an_error():
    with pytest.raises(ValueError, match=r"attributions have shape \(1, 10, 4\); .*\(1, 10\)"):
        context(torch.ones(S, 4))


def test_infidelity_names_a_target_the_model_does_not_have():
    from captum_effattn.metrics import Infidelity

    with pytest.raises(ValueError, match=r"target \[5\] out of range for 2 classes"):
        Infidelity(n_perturb_samples=2)(context(WEIGHTS.clone(), target=5))
