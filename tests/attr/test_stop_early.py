"""``attribute(stop_early=True)``: the same attributions from a forward pass that ends at the last
selected layer."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution, LayerEfficientAttentionAttribution
from tests.attr.helpers import logits_of_last_real_token, text_setup

OPTIONS = [
    {},
    {"layers": [0, 1]},
    {"layers": 0, "heads": [1, 3], "view": "raw"},
    {"reduce": None, "view": "effective"},
    {"query": "all", "weighting": "norm"},
    {"reduce": "rollout"},
]


def _setup(name):
    model, forward, ids, mask = text_setup(name, padding="right")
    if name == "gpt2":
        forward = logits_of_last_real_token(forward)
    return model, forward, ids, mask


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(map(str, o.items())) or "-")
def test_same_attributions_and_delta_as_a_whole_pass(name, options):
    model, forward, ids, mask = _setup(name)
    method = EfficientAttentionAttribution(forward, model=model)
    kwargs = {"target": 1, "additional_forward_args": (mask,), "return_convergence_delta": True}
    whole, whole_delta = method.attribute(ids, **kwargs, **options)
    early, early_delta = method.attribute(ids, stop_early=True, **kwargs, **options)
    torch.testing.assert_close(early, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(early_delta, whole_delta, rtol=0, atol=1e-12)
    assert float(early.abs().sum()) > 0


def test_the_classifier_and_later_layers_never_run():
    model, forward, ids, mask = _setup("bert")
    runs = {"layer 2": 0, "classifier": 0}

    def counter(name):
        def count(*_):
            runs[name] += 1

        return count

    handles = [
        model.bert.encoder.layer[2].register_forward_hook(counter("layer 2")),
        model.classifier.register_forward_hook(counter("classifier")),
    ]
    method = EfficientAttentionAttribution(forward, model=model)
    try:
        method.attribute(ids, additional_forward_args=(mask,), layers=[0, 1], stop_early=True)
        assert runs == {"layer 2": 0, "classifier": 0}
        method.attribute(ids, additional_forward_args=(mask,), layers=[0, 1])
        assert runs == {"layer 2": 1, "classifier": 1}
    finally:
        for handle in handles:
            handle.remove()


def test_gradient_weighting_needs_the_output():
    model, forward, ids, mask = _setup("bert")
    method = EfficientAttentionAttribution(forward, model=model)
    with pytest.raises(ValueError, match=r"stop_early=True.*'gradient'"):
        method.attribute(
            ids, target=0, additional_forward_args=(mask,), weighting="gradient", stop_early=True
        )


def test_target_is_not_checked_without_an_output():
    """Documented: with no output there is nothing to check ``target`` against (it is unused)."""
    model, forward, ids, mask = _setup("bert")
    method = EfficientAttentionAttribution(forward, model=model)
    with pytest.raises(ValueError, match="target"):
        method.attribute(ids, target=99, additional_forward_args=(mask,))
    early = method.attribute(ids, target=99, additional_forward_args=(mask,), stop_early=True)
    torch.testing.assert_close(early, method.attribute(ids, additional_forward_args=(mask,)))


def test_layer_attribution_passes_it_on():
    model, forward, ids, mask = _setup("bert")
    layer_method = LayerEfficientAttentionAttribution(forward, model.bert.embeddings, model=model)
    whole = layer_method.attribute(ids, additional_forward_args=(mask,), layers=[0])
    early = layer_method.attribute(
        ids, additional_forward_args=(mask,), layers=[0], stop_early=True
    )
    torch.testing.assert_close(early, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_attention_matrices_too(name):
    model, forward, ids, mask = _setup(name)
    method = EfficientAttentionAttribution(forward, model=model)
    kwargs = {"additional_forward_args": (mask,), "layers": [0, 1], "weighting": "norm"}
    whole = method.attention_matrices(ids, **kwargs)
    early = method.attention_matrices(ids, stop_early=True, **kwargs)
    torch.testing.assert_close(early, whole, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"stop_early=True.*'gradient'"):
        method.attention_matrices(
            ids, additional_forward_args=(mask,), weighting="gradient", stop_early=True
        )
