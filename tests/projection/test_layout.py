"""Chunks of the row layout: every row once, its own group's values, and views where they can be."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import effective_attention, efficient_attention
from captum_effattn.projection.engine import layout as layout_module
from captum_effattn.projection.engine.layout import build_layout
from captum_effattn.projection.engine.validation import check_inputs
from tests.projection.problems import attention_rows, value_vectors

BATCH, HEADS, QUERIES, KEYS, WIDTH = 4, 3, 2, 14, 3


def problem(padded: bool, seed: int = 0, causal: bool = False):
    """``(attn (B, H, Q, n), values (B, H, n, d), key_mask (B, n))``; with ``padded``, each example
    has its own number of real keys (so groups differ in their last real key); ``causal``: every
    row (``Q = n``), row ``i`` on keys ``<= i``."""
    gen = torch.Generator().manual_seed(seed)
    key_mask = torch.ones(BATCH, KEYS, dtype=torch.bool)
    if padded:
        for b in range(BATCH):
            key_mask[b, KEYS - 2 * b :] = False
    queries = KEYS if causal else QUERIES
    attn = attention_rows(BATCH, HEADS, queries, KEYS, sharpness=3.0, generator=gen)
    visible = key_mask[:, None, None, :]
    if causal:
        visible = visible & torch.ones(KEYS, KEYS, dtype=torch.bool).tril()
    attn = attn * visible
    attn = attn / attn.sum(-1, keepdim=True)
    return attn, value_vectors(BATCH, HEADS, KEYS, WIDTH, generator=gen), key_mask


def chunks_of(attn, values, key_mask, causal=False):
    checked = check_inputs(attn, values, key_mask[:, None], causal)
    layout = build_layout(checked, causal)
    return layout, list(layout.chunks(WIDTH + 1))


def budget_of_two_groups(monkeypatch) -> None:
    """A chunk budget of about two groups of this problem (whatever their trimmed width)."""
    per_group = layout_module.group_bytes(KEYS, QUERIES, WIDTH + 1)
    monkeypatch.setattr(layout_module, "CHUNK_BYTES", 2 * per_group)


@pytest.fixture
def two_groups_a_chunk(monkeypatch):
    budget_of_two_groups(monkeypatch)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_chunks_hold_every_row_once_with_its_groups_values(two_groups_a_chunk, padded, causal):
    attn, values, key_mask = problem(padded, causal=causal)
    layout, chunks = chunks_of(attn, values, key_mask, causal)
    assert len(chunks) > 1
    seen = torch.cat([chunk.row_ids for chunk in chunks])
    assert torch.equal(seen.sort().values, torch.arange(len(layout.rows)))
    for chunk in chunks:
        n_c = chunk.rows.shape[-1]
        assert torch.equal(chunk.rows, layout.rows[chunk.row_ids, :n_c])
        group_of_row = layout.row_group[chunk.row_ids]
        source = layout.group_source[group_of_row]
        assert torch.equal(chunk.values[chunk.group], layout.unit_values(source, n_c))
        assert torch.equal(chunk.key_mask[chunk.group], layout.row_masks()[chunk.row_ids, :n_c])


def test_consecutive_groups_come_as_views_of_the_layout(two_groups_a_chunk):
    """Unpadded, non-causal rows (one group per head, rows in group order): the rows are views;
    the values are converted to float64 chunk by chunk, each chunk only its own groups'."""
    attn, values, key_mask = problem(padded=False)
    values = values.float()
    layout, chunks = chunks_of(attn, values, key_mask)
    assert len(chunks) > 1
    assert layout.source_values.untyped_storage().data_ptr() == values.untyped_storage().data_ptr()
    for chunk in chunks:
        assert chunk.rows.untyped_storage().data_ptr() == layout.rows.untyped_storage().data_ptr()
        assert chunk.values.dtype == torch.float64
        assert chunk.values.untyped_storage().nbytes() == chunk.values.numel() * 8
        assert len(chunk.values) == int(chunk.group.max()) + 1


@pytest.mark.parametrize("projection", [efficient_attention, effective_attention])
@pytest.mark.parametrize("padded", [False, True])
def test_projections_do_not_depend_on_the_chunking(monkeypatch, projection, padded):
    attn, values, key_mask = problem(padded, seed=1)
    whole = projection(attn, values, key_mask[:, None])
    budget_of_two_groups(monkeypatch)
    chunked = projection(attn, values, key_mask[:, None])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("projection", [efficient_attention, effective_attention])
def test_chunked_views_leave_float64_inputs_untouched(two_groups_a_chunk, projection):
    """float64 rows reach the chunks as views of the input (values as copies): nothing may write
    through them."""
    attn, values, key_mask = problem(padded=False, seed=2)
    before = attn.clone(), values.clone()
    projection(attn, values, key_mask[:, None])
    assert torch.equal(attn, before[0])
    assert torch.equal(values, before[1])
