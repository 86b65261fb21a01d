"""Projections computed from queries and keys (PyTorch path): same rows as materializing the
softmax, no (n, n) intermediate, and specific errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from captum_effattn.projection import (
    attention_rows,
    effective_attention,
    effective_attention_from_qk,
    efficient_attention,
    efficient_attention_from_qk,
)
from tests.reference import materialized


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(11)


def qkv(batch, heads, kv_heads, n, d_k, d_v, gen, dtype=torch.float64):
    query = torch.randn(*batch, heads, n, d_k, generator=gen, dtype=dtype)
    key = torch.randn(*batch, kv_heads, n, d_k, generator=gen, dtype=dtype)
    values = torch.randn(*batch, kv_heads, n, d_v, generator=gen, dtype=dtype)
    return query, key, values


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "rows"),
    [((2,), 4, 2, [5, -1, 40, 5]), ((), 3, 3, 17), ((2, 1), 2, 1, None)],
)
@pytest.mark.parametrize("project", ["efficient", "effective"])
def test_matches_materializing_the_softmax(batch, heads, kv_heads, rows, causal, project, gen):
    n, d_k, d_v = 48, 16, 5
    query, key, values = qkv(batch, heads, kv_heads, n, d_k, d_v, gen)
    mask = torch.ones(*batch, n, dtype=torch.bool)
    if batch:
        mask[0, ..., n - 9 :] = False
    full = materialized(query, key, mask, causal, 0.3)
    index = torch.arange(n) if rows is None else torch.tensor(rows).reshape(-1) % n
    repeated = values.repeat_interleave(heads // kv_heads, dim=-3)
    row_mask = mask[..., None, :]
    reference_fn = {"efficient": efficient_attention, "effective": effective_attention}[project]
    from_qk = {"efficient": efficient_attention_from_qk, "effective": effective_attention_from_qk}
    if causal:
        expected = reference_fn(full, repeated, row_mask, causal=True)[..., index, :]
    else:
        expected = reference_fn(full[..., index, :], repeated, row_mask)
    x, cert = from_qk[project](
        query, key, values, mask, causal, rows=rows, scaling=0.3, return_certificate=True
    )
    assert x.shape == expected.shape == (*batch, heads, len(index), n)
    assert cert.output_error.shape == x.shape[:-1]
    torch.testing.assert_close(x, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        attention_rows(query, key, mask, causal, rows=rows, scaling=0.3),
        full[..., index, :],
        atol=1e-14,
        rtol=0,
    )
    if project == "efficient":
        assert (x >= 0).all()
        assert cert.all_converged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_inputs(dtype, gen):
    query, key, values = qkv((1,), 2, 2, 80, 32, 8, gen, dtype=dtype)
    x = efficient_attention_from_qk(query, key, values, rows=[0, 79])
    assert x.dtype == dtype
    full = materialized(query, key, None, False, 32**-0.5)
    expected = efficient_attention(full[..., [0, 79], :], values.double())
    # Attention in float32, projection in float64, then rounding to the input's dtype.
    atol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(x.double(), expected, atol=atol, rtol=0)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_one_row_never_forms_an_n_by_n_tensor(causal, gen):
    n, heads = 1024, 2
    query, key, values = qkv((1,), heads, heads, n, 16, 8, gen, dtype=torch.float32)
    with LargestTensor() as streaming:
        efficient_attention_from_qk(query, key, values, causal=causal, rows=-1)
    with LargestTensor() as materializing:
        (query @ key.mT).softmax(-1)
    # The detector sees the full matrix when it is formed ...
    assert materializing.numel >= heads * n * n
    # ... and the streaming path stays linear in n: nothing beyond a few (n, d) tensors.
    assert streaming.numel <= 64 * n


def test_bad_inputs(gen):
    query, key, values = qkv((1,), 4, 2, 10, 8, 3, gen)
    with pytest.raises(ValueError, match=r"query must have shape \(\*batch, H_q, n_q, d_k\)"):
        attention_rows(query[0, 0], key)
    with pytest.raises(ValueError, match=r"key must have shape .* with d_k = 8"):
        attention_rows(query, key[..., :7])
    with pytest.raises(ValueError, match=r"query has 4 heads and key 3"):
        attention_rows(query, torch.cat([key, key[:, :1]], 1))
    with pytest.raises(TypeError, match=r"query and key must share one dtype"):
        attention_rows(query, key.float())
    with pytest.raises(ValueError, match=r"values must have shape .* H_kv = 2 heads and n = 10"):
        efficient_attention_from_qk(query, key, values[..., :9, :])
    with pytest.raises(ValueError, match=r"causal=True needs one query per key"):
        attention_rows(query[..., :5, :], key, causal=True)
    with pytest.raises(ValueError, match=r"rows must be query positions in \[-10, 10\).*got 10"):
        attention_rows(query, key, rows=[0, 10])
    with pytest.raises(TypeError, match=r"rows must be an int"):
        attention_rows(query, key, rows=[0.5])
    with pytest.raises(ValueError, match=r"scaling must be a finite number"):
        attention_rows(query, key, scaling=float("nan"))
    bad = query.clone()
    bad[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"query contains 1 non-finite value.*\[0, 1, 2, 3\]"):
        attention_rows(bad, key)
    with pytest.raises(ValueError, match=r"leading \(batch\) dimensions do not broadcast"):
        attention_rows(query.expand(2, 4, 10, 8), key.expand(3, 2, 10, 8))
    with pytest.raises(TypeError, match=r"values must be a torch.Tensor"):
        efficient_attention_from_qk(query, key, None)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        attention_rows(query, key, backend="cuda")


def test_rows_that_see_no_real_key(gen):
    query, key, _ = qkv((2,), 2, 2, 10, 8, 3, gen)
    left_padded = torch.ones(2, 10, dtype=torch.bool)
    left_padded[1, :4] = False
    # Causal row 2 of the left-padded example sees only padding; row 4 sees a real key.
    with pytest.raises(ValueError, match=r"query row 2 of the example at batch index \[1\] sees"):
        attention_rows(query, key, left_padded, causal=True, rows=[5, 2])
    rows = attention_rows(query, key, left_padded, causal=True, rows=4)
    assert rows[1, :, 0, 4].eq(1).all()
