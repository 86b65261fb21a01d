"""EfficientAttentionAttribution on tiny random-weight models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import VIEWS
from captum_effattn.models import capture_attention
from tests.attr.helpers import (
    TEXT_MODELS,
    forward_embeddings,
    logits_of_last_real_token,
    positions,
    text_setup,
)
from tests.models.tiny import NUM_HEADS, NUM_LAYERS, tiny_inputs, tiny_model


def _padding(name):
    return "left" if name in ("gpt2", "llama") else "right"


@pytest.mark.parametrize("name", TEXT_MODELS)
@pytest.mark.parametrize("view", tuple(VIEWS))
def test_token_scores_have_the_input_shape_and_zero_padding(name, view):
    model, forward, ids, mask = text_setup(name, _padding(name))
    explainer = EfficientAttentionAttribution(forward, model=model)
    scores, delta = explainer.attribute(
        ids, additional_forward_args=(mask,), view=view, return_convergence_delta=True
    )
    assert scores.shape == ids.shape
    assert scores.is_floating_point()
    assert (scores[mask == 0] == 0).all()
    assert delta.shape == (ids.shape[0],)
    assert delta.max() <= (1e-9 if VIEWS[view].solves else 0)
    if VIEWS[view].distribution:  # distributions averaged over heads are distributions
        torch.testing.assert_close(scores.sum(-1), torch.ones(len(ids)), atol=1e-5, rtol=0)
        assert (scores >= 0).all()


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_raw_view_is_the_mean_attention_row_of_the_query(name):
    model, forward, ids, mask = text_setup(name, _padding(name), implementation="eager")
    explainer = EfficientAttentionAttribution(forward, model=model)
    scores = explainer.attribute(ids, additional_forward_args=(mask,), view="raw")
    causal = name in ("gpt2", "llama")
    extra = {"position_ids": positions(mask)} if causal else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, **extra)
    stacked = torch.stack(out.attentions, 1)  # (B, L, H, S, S)
    query = (mask.shape[1] - 1 - mask.flip(1).argmax(1)) if causal else mask.argmax(1)
    expected = stacked[torch.arange(len(ids)), :, :, query].mean((1, 2)) * mask
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_efficient_rows_move_on_inputs_longer_than_the_head_width(name):
    model, forward, ids, mask = text_setup(name, None)
    explainer = EfficientAttentionAttribution(forward, model=model)
    raw = explainer.attribute(ids, additional_forward_args=(mask,), view="raw")
    efficient = explainer.attribute(ids, additional_forward_args=(mask,), view="efficient")
    assert (raw - efficient).abs().max() > 1e-3


def test_same_loop_as_integrated_gradients_and_saliency():
    """The pipeline users have: IG and Saliency on embeddings, plus efficient attention."""
    model, _, ids, mask = text_setup("bert")
    forward = forward_embeddings(model)
    embeddings = model.get_input_embeddings()(ids).detach()
    results = {}
    for method in (
        IntegratedGradients(forward),
        Saliency(forward),
        EfficientAttentionAttribution(forward, model=model),
    ):
        kwargs = {"n_steps": 8} if isinstance(method, IntegratedGradients) else {}
        results[type(method).__name__] = method.attribute(
            embeddings, target=1, additional_forward_args=(mask,), **kwargs
        )
    assert {tuple(r.shape) for r in results.values()} == {tuple(embeddings.shape)}
    # Spread evenly over the features: summing them gives the token scores back.
    by_ids = EfficientAttentionAttribution(lambda i, m: model(input_ids=i, attention_mask=m), model)
    tokens = by_ids.attribute(ids, additional_forward_args=(mask,))
    ours = results["EfficientAttentionAttribution"]
    torch.testing.assert_close(ours.sum(-1), tokens, atol=1e-6, rtol=0)


def test_noise_tunnel_wraps_it_like_any_captum_method():
    model, _, ids, mask = text_setup("bert")
    forward = forward_embeddings(model)
    embeddings = model.get_input_embeddings()(ids).detach()
    tunnel = NoiseTunnel(EfficientAttentionAttribution(forward, model=model))
    smoothed, delta = tunnel.attribute(
        embeddings,
        nt_type="smoothgrad",
        nt_samples=3,
        stdevs=0.01,
        additional_forward_args=(mask,),
        target=0,
        return_convergence_delta=True,
    )
    assert smoothed.shape == embeddings.shape
    assert delta.shape == (3 * len(ids),)
    assert torch.isfinite(smoothed).all()


def test_causal_lm_with_a_class_score_forward():
    model, forward, ids, mask = text_setup("gpt2", "left")
    classify = logits_of_last_real_token(forward)
    scores = EfficientAttentionAttribution(classify, model=model).attribute(
        ids, target=5, additional_forward_args=(mask,)
    )
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    assert (scores[0] > 0).sum() > 1  # the last row of an unpadded example sees every token
    assert (last == ids.shape[1] - 1).all()


@pytest.mark.parametrize("view", tuple(VIEWS))
def test_vit_pixels_get_their_patch_scores(view):
    model = tiny_model("vit")
    pixels = tiny_inputs("vit")["pixel_values"]
    explainer = EfficientAttentionAttribution(lambda p: model(pixel_values=p).logits, model)
    scores = explainer.attribute(pixels, view=view)
    assert scores.shape == pixels.shape
    per_patch = explainer.attribute(pixels, view=view, reduce="mean")
    # Every pixel of one 8 x 8 patch (3 channels) carries the same share.
    patch = per_patch[:, :, :8, :8]
    torch.testing.assert_close(patch, patch[:, :1, :1, :1].expand_as(patch))
    tokens = explainer.attribute(pixels, view=view, reduce=None).mean((1, 2))  # (B, 17)
    torch.testing.assert_close(scores.sum((1, 2, 3)), tokens[:, 1:].sum(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_query_reduce_and_selection_options(name):
    model, forward, ids, mask = text_setup(name, _padding(name))
    explainer = EfficientAttentionAttribution(forward, model=model)
    args = (mask,)
    per_head = explainer.attribute(ids, additional_forward_args=args, reduce=None)
    assert per_head.shape == (len(ids), NUM_LAYERS, NUM_HEADS, ids.shape[1])
    mean = explainer.attribute(ids, additional_forward_args=args)
    torch.testing.assert_close(per_head.mean((1, 2)), mean, atol=1e-6, rtol=0)
    total = explainer.attribute(ids, additional_forward_args=args, reduce="sum")
    torch.testing.assert_close(total, per_head.sum((1, 2)), atol=1e-6, rtol=0)
    peak = explainer.attribute(ids, additional_forward_args=args, reduce="max")
    torch.testing.assert_close(peak, per_head.amax((1, 2)), atol=1e-6, rtol=0)
    one = explainer.attribute(
        ids, additional_forward_args=args, layers=-1, heads=[1, 3], reduce=None
    )
    torch.testing.assert_close(one[:, 0], per_head[:, -1, [1, 3]], atol=1e-6, rtol=0)
    mapping = explainer.attribute(ids, additional_forward_args=args, heads={0: 2, 2: [0, 1]})
    expected = torch.cat([per_head[:, 0, [2]], per_head[:, 2, [0, 1]]], 1).mean(1)
    torch.testing.assert_close(mapping, expected, atol=1e-6, rtol=0)
    everything = explainer.attribute(ids, additional_forward_args=args, query="all")
    torch.testing.assert_close(everything.sum(-1), torch.ones(len(ids)), atol=1e-5, rtol=0)
    position = 3 if name == "bert" else -1
    fixed = explainer.attribute(ids[:1], additional_forward_args=(mask[:1],), query=position)
    assert fixed.shape == (1, ids.shape[1])


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("view", ["raw", "efficient"])
def test_rollout_of_distributions_is_a_distribution(name, view):
    model, forward, ids, mask = text_setup(name, _padding(name))
    explainer = EfficientAttentionAttribution(forward, model=model)
    rolled = explainer.attribute(ids, additional_forward_args=(mask,), view=view, reduce="rollout")
    torch.testing.assert_close(rolled.sum(-1), torch.ones(len(ids)), atol=1e-5, rtol=0)
    assert (rolled >= -1e-7).all()
    assert (rolled[mask == 0] == 0).all()
    one_layer = explainer.attribute(
        ids, additional_forward_args=(mask,), view=view, reduce="rollout", layers=[1]
    )
    mean = explainer.attribute(ids, additional_forward_args=(mask,), view=view, layers=[1])
    # One layer of rollout is the head average mixed with the residual.
    query = torch.zeros_like(mean)
    causal = name != "bert"
    position = (mask.shape[1] - 1 - mask.flip(1).argmax(1)) if causal else mask.argmax(1)
    query[torch.arange(len(ids)), position] = 1
    torch.testing.assert_close(one_layer, 0.5 * mean + 0.5 * query, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_attention_matrices_are_distributions_for_real_queries(name):
    model, forward, ids, mask = text_setup(name, _padding(name))
    explainer = EfficientAttentionAttribution(forward, model=model)
    matrices, delta = explainer.attention_matrices(
        ids, additional_forward_args=(mask,), return_convergence_delta=True
    )
    length = ids.shape[1]
    assert matrices.shape == (len(ids), NUM_LAYERS, NUM_HEADS, length, length)
    real = mask.bool()
    rows = matrices.permute(0, 3, 1, 2, 4)[real]  # (real queries, L, H, S)
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]), atol=1e-5, rtol=0)
    assert (rows >= 0).all()
    assert delta.max() <= 1e-9


@pytest.mark.parametrize(
    ("name", "padding"), [(n, _padding(n)) for n in TEXT_MODELS] + [("gpt2", "right")]
)
@pytest.mark.parametrize("query", ["auto", "all"])
def test_batch_invariance_alone_versus_padded(name, padding, query):
    model, forward, ids, mask = text_setup(name, padding)
    explainer = EfficientAttentionAttribution(forward, model=model)
    batch = explainer.attribute(ids, additional_forward_args=(mask,), query=query)
    for b in range(len(ids)):
        real = mask[b].bool()
        alone = explainer.attribute(
            ids[b : b + 1, real], additional_forward_args=(mask[b : b + 1, real],), query=query
        )
        torch.testing.assert_close(batch[b, real], alone[0], atol=1e-6, rtol=0)
        assert (batch[b, ~real] == 0).all()


def test_model_comes_back_exactly_as_it_was_also_after_an_error():
    model, forward, ids, mask = text_setup("bert")
    before = (model.config._attn_implementation, model.training, torch.is_grad_enabled())
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    explainer = EfficientAttentionAttribution(forward, model=model)
    explainer.attribute(ids, additional_forward_args=(mask,))

    def failing(ids, mask):
        model(input_ids=ids, attention_mask=mask)
        raise RuntimeError("boom in the user's forward")

    with pytest.raises(ValueError, match="boom in the user's forward"):
        EfficientAttentionAttribution(failing, model=model).attribute(
            ids, additional_forward_args=(mask,)
        )
    after = (model.config._attn_implementation, model.training, torch.is_grad_enabled())
    hooks_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert after == before
    assert hooks_after == hooks_before
    with capture_attention(model) as record:  # and it can be captured again
        model(input_ids=ids, attention_mask=mask)
    assert len(record.layers) == NUM_LAYERS
