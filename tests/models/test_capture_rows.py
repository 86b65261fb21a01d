"""Capture computes its rows with the one attention-rows module and gives the rows it gave before.

The reference is the former dense computation written out: an explicit ``(S_q, S_k)`` mask,
hidden scores at float32's minimum, key/value heads repeated, rows without keys zeroed.
"""

from __future__ import annotations

import pytest
import torch

from captum_effattn.models import capture_attention, select_heads
from captum_effattn.models.capture import _share_masking, rows_of_layers
from tests.models.tiny import tiny_inputs, tiny_model


def former_rows(query, key, key_mask, scaling):
    """The dense causal computation capture used before the rows module (n x n masks)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    q_len, k_len = query.shape[-2], key.shape[-2]
    keys = key.repeat_interleave(heads // kv_heads, dim=1)
    allowed = key_mask[:, None, None, :] & torch.ones(q_len, k_len, dtype=torch.bool).tril(
        k_len - q_len
    )
    scores = ((query @ keys.transpose(-1, -2)) * scaling).float()
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return (scores.softmax(-1) * allowed.any(-1, keepdim=True)).to(query.dtype)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_causal_rows_are_the_former_ones(name, padding):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding=padding)
    with torch.no_grad():
        with capture_attention(model, materialize=False) as lazy:
            model(**inputs)
        with capture_attention(model) as materialized:
            model(**inputs)
    key_mask = inputs["attention_mask"].bool()
    for deferred, full in zip(lazy.layers, materialized.layers, strict=True):
        assert deferred.query is not None
        assert deferred.key is not None
        assert torch.equal(deferred.key_mask, key_mask)
        expected = former_rows(deferred.query, deferred.key, key_mask, deferred.scaling)
        torch.testing.assert_close(deferred.attn, expected, rtol=0, atol=1e-7)
        positions = torch.tensor([[15, 3], [15, 0]])
        picked = expected.gather(
            2, positions[:, None, :, None].expand(-1, expected.shape[1], -1, 16)
        )
        torch.testing.assert_close(deferred.rows(positions), picked, rtol=0, atol=1e-7)
        # The materialized layer ran the same rows during the forward (its inputs come from
        # explicit attention in earlier layers, the lazy one's from sdpa: rounding apart).
        torch.testing.assert_close(full.attn, deferred.attn, rtol=0, atol=1e-5)
    if padding == "left":
        # Padding queries before the first real token see no key: all zeros, no NaN.
        assert (lazy.layers[0].attn[1, :, :5] == 0).all()


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "qwen2", "t5"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize(
    "positions", [torch.tensor([[0, 7, 15], [0, 7, 15]]), torch.tensor([[15, 2], [9, 0]])]
)
def test_rows_of_several_layers_are_each_layers_rows_stacked(name, padding, positions):
    # Stacked where the layers share masking and scale (bert, gpt2, llama with grouped-query
    # heads), layer by layer where they do not (qwen2's sliding window in layer 1, t5's bias).
    model = tiny_model(name)
    selection = select_heads(model, heads={0: [0, 2], -1: [1]})
    with torch.no_grad(), capture_attention(model, selection, materialize=False) as record:
        model(**tiny_inputs(name, padding=padding))
    layers = record.layers
    assert _share_masking(layers) is (name in ("bert", "gpt2", "llama"))
    stacked = rows_of_layers(layers, positions)
    one_by_one = torch.cat([c.rows(positions) for c in layers], dim=1)
    assert stacked.shape == (2, 3, positions.shape[-1], 16)
    torch.testing.assert_close(stacked, one_by_one, rtol=0, atol=0)
    # Rows of real queries are distributions over the keys they see.
    real = layers[0].key_mask.gather(1, positions)
    sums = stacked.sum(-1)
    torch.testing.assert_close(
        sums[real[:, None, :].expand_as(sums)],
        torch.ones(()).expand(int(real.sum()) * 3),
        rtol=0,
        atol=1e-6,
    )


def test_stacked_rows_differentiate_like_each_layers_rows():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    with capture_attention(model, materialize=False, keep_graph=True) as record:
        model(**inputs)
    positions = torch.tensor([3, 15])
    layers = record.layers
    heads = len(layers) * model.config.num_attention_heads
    weights = torch.randn(2, heads, 2, 16, generator=torch.Generator().manual_seed(0))
    stacked = torch.autograd.grad(
        (rows_of_layers(layers, positions) * weights).sum(),
        [c.query for c in layers],
        retain_graph=True,  # later layers' keys depend on earlier layers' queries
    )
    one_by_one = torch.autograd.grad(
        (torch.cat([c.rows(positions) for c in layers], dim=1) * weights).sum(),
        [c.query for c in layers],
    )
    for got, expected in zip(stacked, one_by_one, strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


def test_half_precision_layers_are_read_one_by_one():
    # Stacking would convert every layer's keys to float32 at once; one by one holds one copy.
    model = tiny_model("bert").to(torch.bfloat16)
    with torch.no_grad(), capture_attention(model, materialize=False) as record:
        model(**tiny_inputs("bert"))
    layers = record.layers
    assert not _share_masking(layers)
    positions = torch.tensor([[0, 4], [0, 9]])
    stacked = rows_of_layers(layers, positions)
    assert stacked.dtype == torch.bfloat16
    assert torch.equal(stacked, torch.cat([c.rows(positions) for c in layers], dim=1))
