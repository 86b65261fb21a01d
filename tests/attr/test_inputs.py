"""Inputs that cannot be attributed get a specific error before (or instead of) a wrong answer."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from tests.attr.helpers import text_setup

VIEWS = ("efficient", "effective", "raw")


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("reduce", ["mean", "rollout", None])
def test_an_all_padding_example_is_an_error_in_every_view(name, view, reduce):
    model, forward, ids, mask = text_setup(name)
    mask = mask.clone()
    mask[1] = 0
    explainer = EfficientAttentionAttribution(forward, model=model)
    with pytest.raises(ValueError, match="example 1 is all padding"):
        explainer.attribute(ids, additional_forward_args=(mask,), view=view, reduce=reduce)


@pytest.mark.parametrize(("name", "padding"), [("bert", "right"), ("gpt2", "left")])
@pytest.mark.parametrize("view", VIEWS)
def test_rollout_gives_exactly_zero_on_padding(name, padding, view):
    model, forward, ids, mask = text_setup(name, padding)
    explainer = EfficientAttentionAttribution(forward, model=model)
    scores = explainer.attribute(ids, additional_forward_args=(mask,), view=view, reduce="rollout")
    assert (scores[mask == 0] == 0).all()
    assert (scores[mask == 1] != 0).any()
