"""Capture computes its rows with the one attention-rows module and gives the rows it gave before.

The reference is the former dense computation written out: an explicit ``(S_q, S_k)`` mask,
hidden scores at float32's minimum, key/value heads repeated, rows without keys zeroed.
"""

from __future__ import annotations

import pytest
import torch

from captum_effattn.models import capture_attention
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
