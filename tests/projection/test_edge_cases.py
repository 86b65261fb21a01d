"""Hard cases on purpose: peaked and flat rows, rank deficiency, sizes, padding, causal, dtypes."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import efficient_attention
from tests.projection.problems import attention_rows, head_output_error, value_vectors


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2)


def assert_valid_efficient(x, attn, values, key_mask=None, out_tol=1e-9):
    mask = (
        torch.ones_like(x, dtype=torch.bool)
        if key_mask is None
        else key_mask[..., None, :].expand_as(x)
    )
    assert (x >= 0).all()
    assert (x[~mask] == 0).all()
    assert ((x * mask).sum(-1) - 1).abs().max() <= 1e-12
    a = attn.double() * mask
    a = a / a.sum(-1, keepdim=True)
    assert head_output_error(x, a, values).max() <= out_tol


@pytest.mark.parametrize("sharpness", [30.0, 300.0])
def test_near_one_hot_rows(gen, sharpness):
    attn = attention_rows(4, 200, 200, sharpness=sharpness, generator=gen)
    values = value_vectors(4, 200, 16, generator=gen)
    x, cert = efficient_attention(attn, values, return_certificate=True)
    assert_valid_efficient(x, attn, values)
    assert cert.all_converged


def test_exactly_one_hot_rows_are_kept(gen):
    """A vertex of the simplex whose value vector is not a mix of others is the only valid row."""
    n = 100
    attn = torch.eye(n, dtype=torch.float64)[torch.randint(n, (10,), generator=gen)]
    values = value_vectors(n, 12, generator=gen)
    x = efficient_attention(attn, values)
    assert_valid_efficient(x, attn, values)


def test_uniform_rows(gen):
    attn = torch.full((3, 150, 150), 1 / 150, dtype=torch.float64)
    values = value_vectors(3, 150, 8, generator=gen)
    x, cert = efficient_attention(attn, values, return_certificate=True)
    assert_valid_efficient(x, attn, values)
    # The uniform row is the minimum-norm point of the whole simplex: nothing to move.
    torch.testing.assert_close(x, attn, atol=1e-14, rtol=0)
    assert cert.all_converged


def test_duplicate_and_zero_value_vectors(gen):
    """Rank deficiency: repeated tokens (layer-0 style) and dead values."""
    n, d = 120, 16
    distinct = value_vectors(30, d, generator=gen)
    values = distinct[torch.randint(30, (n,), generator=gen)]
    values[::7] = 0
    attn = attention_rows(2, 40, n, sharpness=3.0, generator=gen)
    x, cert = efficient_attention(attn, values, return_certificate=True)
    assert_valid_efficient(x, attn, values)
    assert cert.all_converged
    # Keys with identical value vectors are interchangeable: the minimum-norm row weighs them
    # equally.
    same = (values[:, None] == values[None]).all(-1)
    for i, j in same.triu(1).nonzero()[:50].tolist():
        torch.testing.assert_close(x[..., i], x[..., j], atol=1e-10, rtol=0)


def test_rank_deficient_values_with_few_distinct_keys(gen):
    """Fewer distinct value vectors than d + 1: the row is not identifiable even when n <= d + 1."""
    values = value_vectors(3, 8, generator=gen)[torch.tensor([0, 1, 2, 0, 1, 2])]
    attn = attention_rows(5, 6, generator=gen)
    x = efficient_attention(attn, values)
    assert_valid_efficient(x, attn, values)
    torch.testing.assert_close(x[:, :3], x[:, 3:], atol=1e-12, rtol=0)


def test_single_key():
    attn = torch.ones(2, 1, 1, dtype=torch.float64)
    values = torch.randn(2, 1, 4, dtype=torch.float64)
    assert torch.equal(efficient_attention(attn, values), attn)


def test_long_rows_n_1024(gen):
    attn = attention_rows(1, 6, 1024, sharpness=3.0, generator=gen)
    values = value_vectors(1, 1024, 32, generator=gen)
    x, cert = efficient_attention(attn, values, return_certificate=True)
    assert_valid_efficient(x, attn, values)
    assert cert.all_converged


def test_padded_batch_equals_each_example_alone(gen):
    lengths = [70, 45, 100]
    n, d, heads = 100, 8, 2
    attn = torch.zeros(3, heads, n, n, dtype=torch.float64)
    values = value_vectors(3, heads, n, d, generator=gen)
    mask = torch.zeros(3, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        attn[b, :, :, :length] = attention_rows(heads, n, length, sharpness=2.0, generator=gen)
        mask[b, :length] = True
    x = efficient_attention(attn, values, key_mask=mask[:, None])
    assert_valid_efficient(x, attn, values, key_mask=mask[:, None])
    for b, length in enumerate(lengths):
        alone = efficient_attention(attn[b, :, :length, :length], values[b, :, :length])
        torch.testing.assert_close(x[b, :, :length, :length], alone, atol=1e-10, rtol=0)
        assert (x[b, ..., length:] == 0).all()


def test_padding_values_do_not_leak_into_the_result(gen):
    attn = attention_rows(1, 10, 60, generator=gen)
    attn[..., 50:] = 0
    attn = attn / attn.sum(-1, keepdim=True)
    values = value_vectors(1, 60, 6, generator=gen)
    mask = torch.arange(60) < 50
    x = efficient_attention(attn, values, key_mask=mask)
    values_changed = values.clone()
    values_changed[:, 50:] = 1e6
    torch.testing.assert_close(
        efficient_attention(attn, values_changed, key_mask=mask), x, atol=1e-12, rtol=0
    )


def test_causal_rows_use_their_own_prefix(gen):
    n, d = 64, 6
    attn = attention_rows(2, n, n, sharpness=2.0, generator=gen).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    values = value_vectors(2, n, d, generator=gen)
    x, cert = efficient_attention(attn, values, causal=True, return_certificate=True)
    assert cert.all_converged
    assert (x.triu(1) == 0).all()
    assert ((x.sum(-1) - 1).abs() <= 1e-12).all()
    # Rows with at most d + 1 visible keys are identifiable as they stand.
    assert torch.equal(x[:, : d + 1], attn[:, : d + 1])
    for i in (d + 1, 30, n - 1):
        prefix = efficient_attention(attn[:, i : i + 1, : i + 1], values[:, : i + 1])
        torch.testing.assert_close(x[:, i : i + 1, : i + 1], prefix, atol=1e-10, rtol=0)
        rows = slice(i, i + 1)
        error = head_output_error(x[:, rows, : i + 1], attn[:, rows, : i + 1], values[:, : i + 1])
        assert error.max() <= 1e-9


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]
)
def test_low_precision_inputs_are_solved_in_float64(gen, dtype, atol):
    attn64 = attention_rows(2, 90, 90, sharpness=2.0, generator=gen)
    values64 = value_vectors(2, 90, 8, generator=gen)
    attn, values = attn64.to(dtype), values64.to(dtype)
    x, cert = efficient_attention(attn, values, return_certificate=True)
    assert x.dtype == dtype
    assert cert.all_converged  # measured in float64 before the cast
    # Same answer as the float64 solve of the rounded inputs, up to the output's own rounding.
    exact = efficient_attention(attn.double(), values.double(), distribution_tol=0.05)
    torch.testing.assert_close(x.double(), exact, atol=atol, rtol=0)
    assert (x >= 0).all()


def test_grouped_query_attention_by_broadcasting(gen):
    batch, kv_heads, group, n, d = 2, 2, 3, 50, 4
    attn = attention_rows(batch, kv_heads, group, n, n, sharpness=2.0, generator=gen)
    values = value_vectors(batch, kv_heads, 1, n, d, generator=gen)
    shared = efficient_attention(attn, values)
    repeated = efficient_attention(attn, values.expand(batch, kv_heads, group, n, d).contiguous())
    torch.testing.assert_close(shared, repeated, atol=1e-12, rtol=0)
    assert_valid_efficient(shared, attn, values)


def test_inputs_are_not_modified(gen):
    attn = attention_rows(2, 40, 40, generator=gen)
    values = value_vectors(2, 40, 4, generator=gen)
    attn_copy, values_copy = attn.clone(), values.clone()
    efficient_attention(attn, values)
    assert torch.equal(attn, attn_copy)
    assert torch.equal(values, values_copy)
