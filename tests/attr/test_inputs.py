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


@pytest.fixture(scope="module")
def gpt2():
    model, forward, ids, mask = text_setup("gpt2", "left")
    return EfficientAttentionAttribution(forward, model=model), model, forward, ids, mask


@pytest.mark.parametrize("reduce", ["mean", "rollout", None])
def test_inference_mode_gives_what_no_grad_gives(gpt2, reduce):
    explainer, _, _, ids, mask = gpt2
    expected = explainer.attribute(ids, additional_forward_args=(mask,), reduce=reduce)
    with torch.inference_mode():
        scores = explainer.attribute(ids, additional_forward_args=(mask,), reduce=reduce)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make_args", "error", "message"),
    [
        (lambda ids, mask: (ids[0], (mask[0],)), ValueError, r"input 0 has shape \(16,\).*batch"),
        (lambda ids, mask: (ids[:0], (mask[:0],)), ValueError, r"shape \(0, 16\).*batch is empty"),
        (
            lambda ids, mask: (ids, (mask[:1],)),
            ValueError,
            r"additional_forward_args\[0\] has shape \(1, 16\).*batch size 2",
        ),
        (
            lambda ids, mask: (ids, {"attention_mask": mask}),
            TypeError,
            r"additional_forward_args is a dict.*tuple",
        ),
        (
            lambda ids, mask: (torch.randint(3, 99, (2, 80)), (torch.ones(2, 80, dtype=int),)),
            ValueError,
            r"80 tokens but GPT2LMHeadModel has learned positions for 64",
        ),
    ],
    ids=["1-D", "batch 0", "mask batch", "dict", "too long"],
)
def test_bad_inputs_get_a_specific_error_before_the_forward(gpt2, make_args, error, message):
    explainer, model, forward, ids, mask = gpt2
    inputs, extra = make_args(ids, mask)
    calls = []
    explainer = EfficientAttentionAttribution(
        lambda *args: calls.append(1) or forward(*args), model=model
    )
    with pytest.raises(error, match=message):
        explainer.attribute(inputs, additional_forward_args=extra)
    assert calls == []  # refused before running the model


@pytest.mark.parametrize(("name", "limit"), [("bert", 64), ("roberta", 62), ("distilbert", 64)])
def test_the_position_limit_is_the_learned_positions(name, limit):
    model, forward, _, _ = text_setup(name)
    explainer = EfficientAttentionAttribution(forward, model=model)
    ids = torch.randint(3, 99, (1, limit))
    explainer.attribute(ids, additional_forward_args=(torch.ones_like(ids),))  # fits
    ids = torch.randint(3, 99, (1, limit + 1))
    with pytest.raises(ValueError, match=f"{limit + 1} tokens but .* positions for {limit} only"):
        explainer.attribute(ids, additional_forward_args=(torch.ones_like(ids),))


def test_a_forward_with_a_key_value_cache_is_refused(gpt2):
    _, model, _, ids, mask = gpt2
    with torch.no_grad():
        cache = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True).cache

    def continuing(new_ids, full_mask):
        return model(input_ids=new_ids, attention_mask=full_mask, cache=cache).logits

    explainer = EfficientAttentionAttribution(continuing, model=model)
    with pytest.raises(ValueError, match=r"8 new tokens attending to 16 keys.*past_key_values"):
        explainer.attribute(ids[:, 8:], additional_forward_args=(mask,))


def test_a_compiled_model_is_refused_at_construction():
    model, forward, _, _ = text_setup("bert")
    compiled = torch.compile(model)  # lazy: nothing compiles until it is called
    with pytest.raises(TypeError, match=r"forward_func is a torch.compile'd module.*_orig_mod"):
        EfficientAttentionAttribution(compiled)
    with pytest.raises(TypeError, match=r"model is a torch.compile'd module.*model._orig_mod"):
        EfficientAttentionAttribution(forward, model=compiled)
    with pytest.raises(TypeError, match=r"forward_func is a torch.compile'd function"):
        EfficientAttentionAttribution(torch.compile(forward), model=model)
    EfficientAttentionAttribution(forward, model=compiled._orig_mod)  # what the message says


def test_vit_with_interpolated_positions_is_attributed_per_patch():
    from tests.models.tiny import NUM_HEADS, NUM_LAYERS, PATCH_SIZE, tiny_model

    model = tiny_model("vit")

    def forward(pixels):
        return model(pixel_values=pixels, interpolate_pos_encoding=True).logits

    explainer = EfficientAttentionAttribution(forward, model=model)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    attributions = explainer.attribute(pixels)
    assert attributions.shape == pixels.shape
    assert torch.isfinite(attributions).all()
    per_head = explainer.attribute(pixels, reduce=None)
    patches = (48 // PATCH_SIZE) ** 2
    assert per_head.shape == (2, NUM_LAYERS, NUM_HEADS, 1 + patches)  # [CLS] and 36 patches
    # Every pixel of a patch carries an equal share of that patch's score.
    blocks = attributions.unfold(2, PATCH_SIZE, PATCH_SIZE).unfold(3, PATCH_SIZE, PATCH_SIZE)
    flat = blocks.reshape(*blocks.shape[:4], -1)
    assert (flat == flat[..., :1]).all()
    assert (flat.abs().sum() > 0).item()
