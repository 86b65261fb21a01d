"""What Captum's own tools expect of an attribution method: baselines, contiguous outputs,
``compute_convergence_delta``, and ``sensitivity_max``."""

from __future__ import annotations

import pytest
import torch
from captum.metrics import sensitivity_max

from captum_effattn import EfficientAttentionAttribution
from tests.attr.helpers import forward_embeddings, text_setup


@pytest.fixture
def embedded():
    """``(explainer, embeddings (B, S, E), mask)`` of the tiny BERT."""
    model, _, ids, mask = text_setup("bert")
    with torch.no_grad():
        embeddings = model.bert.embeddings.word_embeddings(ids)
    return EfficientAttentionAttribution(forward_embeddings(model), model=model), embeddings, mask


def test_embedding_shaped_attributions_are_contiguous_and_normalize_in_place(embedded):
    explainer, embeddings, mask = embedded
    attributions = explainer.attribute(embeddings, additional_forward_args=(mask,))
    assert attributions.shape == embeddings.shape
    assert attributions.is_contiguous()
    assert 0 not in attributions.stride()
    tokens = attributions.sum(-1)
    scale = attributions.abs().amax(dim=(1, 2), keepdim=True)
    attributions /= scale  # in place: an expanded view (stride 0) would raise here
    torch.testing.assert_close(attributions.abs().amax(dim=(1, 2)), torch.ones(2))
    torch.testing.assert_close(attributions.sum(-1), tokens / scale[:, :, 0])


def test_baselines_are_accepted_in_captums_position_and_unused(embedded):
    explainer, embeddings, mask = embedded
    plain = explainer.attribute(embeddings, additional_forward_args=(mask,))
    positional = explainer.attribute(embeddings, torch.zeros_like(embeddings), 1, (mask,))
    keyword = explainer.attribute(
        embeddings, baselines=0.0, target=1, additional_forward_args=(mask,)
    )
    torch.testing.assert_close(positional, plain)
    torch.testing.assert_close(keyword, plain)


def test_compute_convergence_delta_is_the_delta_of_attribute(embedded):
    explainer, embeddings, mask = embedded
    assert explainer.has_convergence_delta()
    for options in ({}, {"view": "effective", "reduce": "rollout"}, {"weighting": "norm"}):
        attributions, delta = explainer.attribute(
            embeddings, additional_forward_args=(mask,), return_convergence_delta=True, **options
        )
        recomputed = explainer.compute_convergence_delta(
            attributions, torch.zeros_like(embeddings), embeddings,
            additional_forward_args=(mask,), **options,
        )  # fmt: skip
        assert recomputed.shape == (2,)
        torch.testing.assert_close(recomputed, delta, atol=0, rtol=0)
    raw = explainer.compute_convergence_delta(
        None, None, embeddings, additional_forward_args=(mask,), view="raw"
    )
    assert (raw == 0).all()


def test_captums_sensitivity_max_runs_on_efficient_attributions(embedded):
    explainer, embeddings, mask = embedded
    sensitivity = sensitivity_max(
        explainer.attribute,
        embeddings,
        perturb_radius=0.01,
        n_perturb_samples=3,
        additional_forward_args=(mask,),
    )
    assert sensitivity.shape == (2,)
    assert torch.isfinite(sensitivity).all()
    assert (sensitivity > 0).all()  # embeddings moved, so did the attention
