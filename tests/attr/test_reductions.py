"""Reductions are types in a registry: each entry's behavior, rollout as its own kind, and
``reduce=None`` keeping its per-head contract."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import REDUCTIONS
from captum_effattn.attr._queries import QueryRows
from captum_effattn.attr._reductions import (
    AttentionReading,
    PairReduction,
    Reduction,
    RolloutReduction,
    get_reduction,
)
from captum_effattn.attr._views import ProjectedRows, get_view
from tests.attr.helpers import text_setup
from tests.models.tiny import NUM_HEADS, NUM_LAYERS


@pytest.fixture(scope="module")
def bert():
    model, forward, ids, mask = text_setup("bert")
    return EfficientAttentionAttribution(forward, model=model), ids, mask


def test_rollout_is_a_kind_of_reduction_not_a_sentinel():
    rollout = get_reduction("rollout")
    assert isinstance(rollout, RolloutReduction)
    assert rollout.reads_full_matrices
    assert rollout.residual == 0.5
    for name in ("mean", "sum", "max"):
        reduction = get_reduction(name)
        assert isinstance(reduction, PairReduction)
        assert not reduction.reads_full_matrices
    assert all(isinstance(r, Reduction) and r.description for r in REDUCTIONS.values())
    assert all(name == r.name for name, r in REDUCTIONS.items())


def test_each_pair_reduction_combines_the_pairs_as_its_name_says():
    per_head = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 4.0, -2.0]]])  # (B=1, P=2, S=3)
    expected = {
        "mean": torch.tensor([[2.0, 2.0, 0.0]]),
        "sum": torch.tensor([[4.0, 4.0, 0.0]]),
        "max": torch.tensor([[3.0, 4.0, 2.0]]),
    }
    pairs = {name: r for name, r in REDUCTIONS.items() if isinstance(r, PairReduction)}
    assert set(pairs) == set(expected)
    for name, reduction in pairs.items():
        torch.testing.assert_close(reduction.combine(per_head), expected[name])


def test_a_pair_reduction_averages_the_real_query_rows_and_their_errors():
    # Two examples, one pair, two query rows; the second example's second row is padding.
    rows = torch.tensor(
        [[[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]], [[[1.0, 0.0, 0.0], [9.0, 9.0, 9.0]]]]
    )
    error = torch.tensor([[[1e-9, 2e-9]], [[3e-9, 7.0]]], dtype=torch.float64)
    real = torch.tensor([[True, True], [True, False]])
    queries = QueryRows(torch.tensor([[0, 1], [0, 1]]), real, all_rows=False)
    projected = ProjectedRows(rows, error, pairs=((0, 0),), queries=queries)
    reading = AttentionReading(captured=(), queries=queries, projected=projected)
    scores, delta = get_reduction("mean").reduce(reading, get_view("raw"))
    torch.testing.assert_close(scores, torch.tensor([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(delta, torch.tensor([2e-9, 3e-9], dtype=torch.float64))


def test_a_registered_rollout_variant_is_one_entry(bert, monkeypatch):
    explainer, ids, mask = bert
    # With the residual alone, nothing flows between tokens: each [CLS] row is one-hot on itself.
    identity = RolloutReduction("rollout_residual_only", "residual stream only", residual=1.0)
    monkeypatch.setitem(REDUCTIONS, identity.name, identity)
    scores = explainer.attribute(ids, additional_forward_args=(mask,), reduce=identity.name)
    expected = torch.zeros(ids.shape)
    expected[:, 0] = 1
    torch.testing.assert_close(scores, expected)
    rolled = explainer.attribute(ids, additional_forward_args=(mask,), reduce="rollout")
    assert not torch.allclose(rolled, expected)
    torch.testing.assert_close(rolled.sum(-1), torch.ones(len(ids)), atol=1e-5, rtol=0)


def test_reduce_none_keeps_a_layer_and_head_axis(bert):
    explainer, ids, mask = bert
    per_head, delta = explainer.attribute(
        ids, additional_forward_args=(mask,), reduce=None, return_convergence_delta=True
    )
    assert per_head.shape == (ids.shape[0], NUM_LAYERS, NUM_HEADS, ids.shape[1])
    assert delta.shape == (ids.shape[0],)
    mean = explainer.attribute(ids, additional_forward_args=(mask,), reduce="mean")
    torch.testing.assert_close(per_head.mean((1, 2)), mean)
    two = explainer.attribute(ids, additional_forward_args=(mask,), reduce=None, layers=[0, 2])
    torch.testing.assert_close(two, per_head[:, [0, 2]])


def test_an_unknown_reduction_lists_the_choices(bert):
    explainer, ids, mask = bert
    with pytest.raises(
        ValueError,
        match=r"reduce must be one of \('mean', 'sum', 'max', 'rollout', None\); got 'median'",
    ):
        explainer.attribute(ids, additional_forward_args=(mask,), reduce="median")
    with pytest.raises(ValueError, match=r"reduce must be one of .*; got \['mean'\]"):
        get_reduction(["mean"])  # type: ignore[arg-type]
