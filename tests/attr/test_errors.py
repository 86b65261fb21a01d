"""Bad input to EfficientAttentionAttribution gets a specific error."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.models import UnsupportedModelError
from tests.attr.helpers import text_setup


@pytest.fixture(scope="module")
def bert():
    model, forward, ids, mask = text_setup("bert")
    return EfficientAttentionAttribution(forward, model=model), ids, mask


def test_unknown_options(bert):
    explainer, ids, mask = bert
    args = (mask,)
    with pytest.raises(
        ValueError, match=r"view must be one of \('raw', 'effective', 'efficient', 'minimal'\)"
    ):
        explainer.attribute(ids, additional_forward_args=args, view="eficient")
    with pytest.raises(ValueError, match="reduce must be one of"):
        explainer.attribute(ids, additional_forward_args=args, reduce="median")
    with pytest.raises(ValueError, match="query must be 'auto', 'all' or an int position"):
        explainer.attribute(ids, additional_forward_args=args, query="cls")


def test_out_of_range_layers_and_heads(bert):
    explainer, ids, mask = bert
    with pytest.raises(IndexError, match=r"layer 3 is out of range .*\(valid: -3\.\.2\)"):
        explainer.attribute(ids, additional_forward_args=(mask,), layers=3)
    with pytest.raises(IndexError, match=r"head 4 is out of range .*\(valid: -4\.\.3\)"):
        explainer.attribute(ids, additional_forward_args=(mask,), heads=[0, 4])


def test_query_positions(bert):
    explainer, ids, mask = bert
    with pytest.raises(
        ValueError, match=r"query position 16 is out of range .*\(valid: -16\.\.15\)"
    ):
        explainer.attribute(ids, additional_forward_args=(mask,), query=16)
    with pytest.raises(ValueError, match="query position 14 is a padding token in example 1"):
        explainer.attribute(ids, additional_forward_args=(mask,), query=14)


def test_rollout_needs_all_heads_of_consecutive_layers(bert):
    explainer, ids, mask = bert
    with pytest.raises(ValueError, match=r"reduce=.rollout. .* consecutive layers"):
        explainer.attribute(ids, additional_forward_args=(mask,), reduce="rollout", layers=[0, 2])
    with pytest.raises(ValueError, match=r"reduce=.rollout. .* all heads"):
        explainer.attribute(ids, additional_forward_args=(mask,), reduce="rollout", heads=[0, 1])


def test_ragged_selection_without_reduction(bert):
    explainer, ids, mask = bert
    with pytest.raises(ValueError, match="needs the same heads in every selected layer"):
        explainer.attribute(
            ids, additional_forward_args=(mask,), heads={0: 1, 1: [0, 2]}, reduce=None
        )


def test_model_in_training_mode():
    model, forward, ids, mask = text_setup("bert")
    model.train()
    with pytest.raises(RuntimeError, match=r"training mode.*model\.eval\(\)"):
        EfficientAttentionAttribution(forward, model=model).attribute(
            ids, additional_forward_args=(mask,)
        )
    assert model.training  # refused, not silently switched


def test_inputs_that_do_not_fit_the_model(bert):
    explainer, ids, mask = bert
    with pytest.raises(ValueError, match=r"forward_func failed on inputs of shapes \[\(2, 16\)\]"):
        explainer.attribute(ids, additional_forward_args=(mask[:, :10],))
    model, forward, ids, mask = text_setup("bert")
    too_many = torch.randint(0, 99, (2, 80))
    with pytest.raises(ValueError, match=r"80 tokens but .* positions for 64 only"):
        EfficientAttentionAttribution(forward, model=model).attribute(
            too_many, additional_forward_args=(torch.ones(2, 80),)
        )
    # A second input not aligned with the sequence cannot take token scores.
    with pytest.raises(ValueError, match=r"input 1 has shape \(2, 7\)"):
        EfficientAttentionAttribution(lambda i, extra, m: forward(i, m), model=model).attribute(
            (ids, torch.zeros(2, 7)), additional_forward_args=(mask,)
        )


def test_forward_that_runs_the_model_twice():
    model, forward, ids, mask = text_setup("bert")

    def twice(ids, mask):
        forward(ids, mask)
        return forward(ids, mask)

    with pytest.raises(RuntimeError, match="2 forward passes"):
        EfficientAttentionAttribution(twice, model=model).attribute(
            ids, additional_forward_args=(mask,)
        )


def test_unsupported_model_and_missing_model():
    config = tf.CTRLConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    ctrl = tf.CTRLModel(config).eval()
    with pytest.raises(UnsupportedModelError, match=r"CTRLModel.*ctrl.*supported"):
        EfficientAttentionAttribution(ctrl)
    with pytest.raises(TypeError, match="pass model="):
        EfficientAttentionAttribution(lambda x: x)
