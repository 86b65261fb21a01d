"""The one attention-rows module against a dense softmax written out in float64."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_effattn.projection.engine import rows as rows_module
from captum_effattn.projection.engine.rows import (
    RowMasking,
    attention_rows_of,
    attention_rows_torch,
    causal_offset,
    padding_of,
)


def dense_reference(query, key, key_mask, causal, scale, additive=None, window=None):
    """Every row of ``softmax(Q K^T * scale + mask)`` in float64, from an explicit ``(n_q, n)``
    mask; rows that see no key are zeros."""
    batch, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    keys = key.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = query.double() @ keys.mT * scale
    if additive is not None:
        scores = scores + additive.double()
    allowed = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    for i in range(q_len):
        for j in range(k_len):
            if causal and j > i + (k_len - q_len):  # queries are the last q_len positions
                allowed[:, :, i, j] = False
            if window is not None and not window[0] <= j - i < window[1]:
                allowed[:, :, i, j] = False
    probabilities = torch.zeros_like(scores)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                seen = allowed[b, 0, i]
                if seen.any():
                    probabilities[b, h, i, seen] = scores[b, h, i, seen].softmax(-1)
    return probabilities


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    k_len = draw(st.integers(1, 12))
    q_len = draw(st.integers(1, k_len))
    d = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    causal = draw(st.booleans())
    padded = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, q_len, d, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, k_len, d, generator=gen).to(dtype)
    key_mask = torch.rand(batch, k_len, generator=gen) > 0.3 if padded else None
    rows = draw(st.lists(st.integers(0, q_len - 1), min_size=1, max_size=4))
    return query, key, key_mask, causal, torch.tensor(rows)


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@settings(max_examples=150, deadline=None)
@given(problems(), st.floats(0.1, 2.0))
def test_rows_match_a_dense_softmax(problem, scale):
    query, key, key_mask, causal, rows = problem
    masking = RowMasking(key_mask=key_mask, causal=causal)
    result = attention_rows_torch(query, key, rows, masking, scale)
    # The inputs are exact in every dtype once upcast: only the arithmetic differs.
    expected = dense_reference(query, key, key_mask, causal, scale)[:, :, rows]
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    assert result.dtype == work
    assert result.shape == expected.shape
    assert not result.isnan().any()
    torch.testing.assert_close(result.double(), expected, atol=TOLERANCE[query.dtype], rtol=0)


def test_causal_queries_are_the_last_positions():
    """With 2 queries over 5 keys, query 0 is position 3: it sees keys 0..3, query 1 all five."""
    assert causal_offset(2, 5) == 3
    query, key = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 5, 4)
    probabilities = attention_rows_torch(
        query, key, torch.tensor([0, 1]), RowMasking(causal=True), 1.0
    )
    assert (probabilities[0, 0, 0, 4] == 0).item()
    assert (probabilities[0, 0, 0, :4] > 0).all()
    assert (probabilities[0, 0, 1] > 0).all()


def test_rows_that_see_no_key_are_zero_also_in_gradients():
    query = torch.randn(1, 2, 4, 3, requires_grad=True)
    key = torch.randn(1, 2, 4, 3, requires_grad=True)
    key_mask = torch.tensor([[False, False, True, True]])  # left padding
    masking = RowMasking(key_mask=key_mask, causal=True)
    probabilities = attention_rows_torch(query, key, torch.arange(4), masking, 0.5)
    assert (probabilities[:, :, :2] == 0).all()
    torch.testing.assert_close(probabilities[:, :, 2:].sum(-1), torch.ones(1, 2, 2))
    (probabilities * torch.randn_like(probabilities)).sum().backward()
    assert query.grad is not None
    assert key.grad is not None
    assert torch.isfinite(query.grad).all()
    assert torch.isfinite(key.grad).all()


def test_per_example_rows_additive_mask_and_grouped_heads():
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 6, 5, generator=gen)
    key = torch.randn(2, 2, 6, 5, generator=gen)
    key_mask = torch.tensor([[True] * 6, [False, True, True, True, True, True]])
    additive = torch.randn(2, 1, 6, 6, generator=gen)
    positions = torch.tensor([[5, 1], [2, 4]])
    masking = RowMasking(key_mask=key_mask, causal=True, additive=additive)
    result = attention_rows_torch(query, key, positions, masking, 0.4)
    dense = dense_reference(query, key, key_mask, True, 0.4, additive)
    for b in range(2):
        torch.testing.assert_close(result[b].double(), dense[b][:, positions[b]], atol=1e-6, rtol=0)


def test_key_ranges_hook_restricts_each_row():
    """The window hook: query i sees keys i-1 <= j < i+2."""
    query, key = torch.randn(1, 1, 6, 3), torch.randn(1, 1, 6, 3)

    def window(positions):
        return positions - 1, positions + 2

    masking = RowMasking(key_ranges=window)
    result = attention_rows_torch(query, key, torch.arange(6), masking, 1.0)
    expected = dense_reference(query, key, None, False, 1.0, window=(-1, 2))
    torch.testing.assert_close(result.double(), expected, atol=1e-6, rtol=0)


def test_chunks_cover_every_row(monkeypatch):
    """A chunk budget of a few rows gives the same rows as one chunk."""
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 2, 9, 4, generator=gen), torch.randn(2, 1, 9, 4, generator=gen)
    masking = RowMasking(key_mask=torch.rand(2, 9, generator=gen) > 0.2, causal=True)
    whole = attention_rows_torch(query, key, torch.arange(9), masking, 0.5)
    monkeypatch.setattr(rows_module, "ROWS_CHUNK_BYTES", 3 * 2 * 2 * 9 * 4 * 2)
    assert rows_module._chunk_rows(2, 2, 9, 4) == 2
    torch.testing.assert_close(
        attention_rows_torch(query, key, torch.arange(9), masking, 0.5), whole
    )


def test_unknown_backend_lists_the_choices():
    query = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'numba'"):
        attention_rows_of(query, query, torch.tensor([0]), RowMasking(), 1.0, backend="cuda")


@pytest.mark.parametrize("causal", [False, True])
def test_padding_of_recovers_the_real_keys(causal):
    key_mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    allowed = key_mask[:, None, None, :].expand(2, 1, 4, 4)
    if causal:
        allowed = allowed & torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(padding_of(allowed, causal, 2), key_mask)
    window = allowed & torch.ones(4, 4, dtype=torch.bool).triu(-1)  # a sliding window
    assert padding_of(window, causal, 2) is None


MEMORY_SCRIPT = """
import resource, torch
from captum_effattn.projection.engine.rows import RowMasking, attention_rows_torch
n = {n}
query, key = torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
key_mask = torch.ones(1, n, dtype=torch.bool)
key_mask[0, :10] = False
masking = RowMasking(key_mask=key_mask, causal=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
row = attention_rows_torch(query, key, torch.tensor([n - 1, n // 2]), masking, 0.3)
assert abs(float(row[0, 0, 0].sum()) - 1) < 1e-5
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_row_of_a_long_sequence_costs_linear_memory():
    """A (16384, 16384) boolean mask alone would be 256 MiB; two causal rows must stay far below."""
    n = 16384
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT.format(n=n)],
        capture_output=True,
        text=True,
        check=True,
    )
    growth_mib = int(result.stdout.strip().splitlines()[-1])
    assert growth_mib < 64, f"peak memory grew by {growth_mib} MiB"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_example", [False, True])
def test_one_row_a_head_matches_a_dense_softmax(dtype, per_example):
    """One query row per head (the [CLS] or the last row) is computed by products and a sum,
    not a batched matmul: the same rows, on a batch of several examples with grouped heads and
    keys laid out as transformers' ``(B, S, H, d)`` views."""
    gen = torch.Generator().manual_seed(21)
    batch, kv_heads, group, n, d = 3, 2, 3, 11, 5
    query = torch.randn(batch, n, kv_heads * group, d, generator=gen).to(dtype).transpose(1, 2)
    key = torch.randn(batch, n, kv_heads, d, generator=gen).to(dtype).transpose(1, 2)
    key_mask = torch.rand(batch, n, generator=gen) > 0.3
    key_mask[:, 0] = True
    rows = torch.tensor([[4], [0], [10]]) if per_example else torch.tensor([7])
    masking = RowMasking(key_mask=key_mask, causal=False)
    result = attention_rows_torch(query, key, rows, masking, 0.4)
    expected = dense_reference(query, key, key_mask, False, 0.4)
    if per_example:
        expected = torch.stack([expected[b, :, rows[b]] for b in range(batch)])
    else:
        expected = expected[:, :, rows]
    assert result.shape == (batch, kv_heads * group, 1, n)
    torch.testing.assert_close(result.double(), expected, atol=TOLERANCE[dtype], rtol=0)
