"""Minimal attention: vertices of the valid rows, checked against an independent LP solver."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from scipy.optimize import linprog

from captum_effattn import efficient_attention, minimal_attention, necessary_keys
from tests.projection.test_properties import SETTINGS, problems
from tests.projection.test_real_minilm import minilm_heads  # noqa: F401  (the real rows)


def _problem(seed, n=30, d=5, q=4, batch=(), sharpness=2.0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(*batch, n, d, generator=g, dtype=torch.float64)
    scores = torch.randn(*batch, q, n, generator=g, dtype=torch.float64) * sharpness
    return scores.softmax(-1), values


def _constraints(values):
    """``[1, V]^T`` as a numpy ``(d + 1, n)`` matrix."""
    v = values.double().numpy()
    return np.vstack([np.ones(len(v)), v.T])


def _assert_vertex(x, a, values, visible):
    """A distribution over the visible keys, exactly ``a``'s head output, on independent keys."""
    x, a, values = x.double(), a.double(), values.double()
    assert (x >= 0).all()
    assert (x[~visible] == 0).all()
    assert abs(float(x.sum()) - 1) <= 1e-12
    a = a * visible / (a * visible).sum()
    error = (x - a) @ values
    assert error.norm() <= 1e-10 * max(float((a @ values).norm()), 1.0)
    support = (x > 0).numpy()
    columns = _constraints(values[visible])[:, support[visible.numpy()]]
    rank = np.linalg.matrix_rank(_constraints(values[visible]))
    assert support.sum() <= rank
    # A vertex: the supported columns of [1, V]^T are linearly independent.
    assert np.linalg.matrix_rank(columns) == support.sum()


def _linprog_minimal(a, values, efficient):
    """The documented rule by HiGHS: on the efficient row's support, maximize sum x_j log e_j."""
    m = _constraints(values)
    face = (efficient > 0).numpy()
    result = linprog(
        -np.log(efficient.numpy()[face]),
        A_eq=m[:, face],
        b_eq=m @ a.numpy(),
        bounds=(0, None),
        method="highs",
    )
    assert result.status == 0
    x = np.zeros(len(a))
    x[face] = result.x
    return x


def _linprog_necessary(a, values):
    """Key j is necessary when min x_j over P(a) is positive (one HiGHS LP per key)."""
    m = _constraints(values)
    flags = []
    for j in range(len(a)):
        cost = np.zeros(len(a))
        cost[j] = 1
        result = linprog(cost, A_eq=m, b_eq=m @ a.numpy(), bounds=(0, None), method="highs")
        assert result.status == 0
        flags.append(result.fun > 1e-7)
    return torch.tensor(flags)


@SETTINGS
@given(problems())
def test_minimal_rows_are_vertices_with_the_same_output(problem):
    attn, values, key_mask, causal, visible = problem
    x, cert = minimal_attention(attn, values, key_mask, causal, return_certificate=True)
    assert x.shape == attn.shape
    assert x.dtype == attn.dtype
    assert cert.all_converged
    assert cert.max_output_error <= 1e-10
    n, d = values.shape[-2:]
    per_row = values.expand(*attn.shape[:-2], n, d).unsqueeze(-3).expand(*attn.shape, d)
    rows, a_rows, v_rows, masks = (
        x.reshape(-1, n),
        attn.reshape(-1, n),
        per_row.reshape(-1, n, d),
        visible.reshape(-1, n),
    )
    for row, a, v, mask in zip(rows, a_rows, v_rows, masks, strict=True):
        _assert_vertex(row, a, v, mask)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "d"), [(12, 3), (40, 6), (90, 8)])
def test_the_documented_vertex_is_the_lp_optimum(seed, n, d):
    attn, values = _problem(seed, n, d, q=3)
    x = minimal_attention(attn, values)
    efficient = efficient_attention(attn, values)
    for row, a, e in zip(x, attn, efficient, strict=True):
        reference = _linprog_minimal(a, values, e)
        np.testing.assert_allclose(row.numpy(), reference, atol=1e-7)
        # Every key of the minimal row is a key of the efficient row.
        assert not ((row > 0) & (e == 0)).any()
        _assert_vertex(row, a, values, torch.ones(n, dtype=torch.bool))


def test_rows_whose_value_space_spans_every_key_come_back_as_given():
    attn, values = _problem(0, n=6, d=8, q=6)
    x, cert = minimal_attention(attn, values, return_certificate=True)
    assert torch.equal(x, attn)
    assert (cert.iterations == 0).all()
    # Padding leaves 5 real keys with d + 1 = 5 > 4: each row is its only valid row.
    attn, values = _problem(1, n=9, d=4, q=2)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    attn = attn * mask
    attn = attn / attn.sum(-1, keepdim=True)
    assert torch.equal(minimal_attention(attn, values, mask), attn)


def test_deterministic_across_calls_batch_order_and_dtype():
    attn, values = _problem(3, n=50, d=6, q=5, batch=(4,))
    first = minimal_attention(attn, values)
    assert torch.equal(first, minimal_attention(attn, values))
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(minimal_attention(attn[order], values[order]), first[order])
    # Each row alone, as in the batch.
    torch.testing.assert_close(minimal_attention(attn[1, 2:3], values[1]), first[1, 2:3])
    single = minimal_attention(attn.float(), values.float())
    assert single.dtype == torch.float32
    assert torch.equal(single > 0, first > 0)
    torch.testing.assert_close(single, first.float(), atol=1e-5, rtol=0)


def test_masks_give_padding_zero_weight_and_match_the_trimmed_problem():
    attn, values = _problem(4, n=40, d=4, q=3)
    mask = torch.ones(40, dtype=torch.bool)
    mask[[0, 7, 8, 30, 39]] = False
    attn = attn * mask / (attn * mask).sum(-1, keepdim=True)
    x = minimal_attention(attn, values, mask)
    assert (x[:, ~mask] == 0).all()
    trimmed = minimal_attention(attn[:, mask], values[mask])
    torch.testing.assert_close(x[:, mask], trimmed)


def test_causal_rows_are_vertices_of_their_prefix():
    attn, values = _problem(5, n=24, d=3, q=24)
    attn = attn.masked_fill(~torch.ones(24, 24, dtype=torch.bool).tril(), 0)
    attn = attn / attn.sum(-1, keepdim=True)
    x = minimal_attention(attn, values, causal=True)
    assert (x.triu(1) == 0).all()
    for i in (0, 3, 4, 10, 23):
        prefix = minimal_attention(attn[i : i + 1, : i + 1], values[: i + 1])
        torch.testing.assert_close(x[i : i + 1, : i + 1], prefix)
        _assert_vertex(x[i], attn[i], values, torch.arange(24) <= i)


def test_grouped_query_values_broadcast():
    g = torch.Generator().manual_seed(6)
    values = torch.randn(2, 2, 1, 30, 4, generator=g, dtype=torch.float64)
    attn = (torch.randn(2, 2, 3, 5, 30, generator=g, dtype=torch.float64) * 2).softmax(-1)
    x = minimal_attention(attn, values)
    expanded = minimal_attention(attn, values.expand(2, 2, 3, 30, 4).contiguous())
    # The shared value head is factored once: the same vertices, to rounding.
    assert torch.equal(x > 0, expanded > 0)
    torch.testing.assert_close(x, expanded, atol=1e-12, rtol=0)
    every_key = torch.ones(30, dtype=torch.bool)
    _assert_vertex(x[1, 0, 2, 4], attn[1, 0, 2, 4], values[1, 0, 0], every_key)


def test_no_warning_and_a_certificate_on_ordinary_rows():
    attn, values = _problem(7, n=80, d=8, q=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, cert = minimal_attention(attn, values, return_certificate=True)
    assert cert.all_converged
    assert cert.converged.shape == (6,)
    assert (cert.iterations > 0).all()
    assert float(cert.simplex_violation.max()) <= 1e-12
    assert ((x > 0).sum(-1) <= 9).all()


def test_necessary_keys_of_a_constructed_row():
    """Key 0 alone carries the first value coordinate: every valid row needs it at weight a_0.
    Keys 1..3 can trade mass along (1, -2, 1) only; moving it down, key 1 (0.1) reaches zero
    before key 3 (0.3), so key 3 keeps at least 0.2 in every valid row."""
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
    attn = torch.tensor([[0.2, 0.1, 0.4, 0.3]], dtype=torch.float64)
    assert necessary_keys(attn, values).tolist() == [[True, False, False, True]]
    assert torch.equal(necessary_keys(attn, values), _linprog_necessary(attn[0], values)[None])
    x = minimal_attention(attn, values)
    assert (x[0, [0, 3]] > 0).all()


@pytest.mark.parametrize("seed", range(8))
def test_necessary_keys_agree_with_linprog(seed):
    attn, values = _problem(seed, n=7, d=3, q=3, sharpness=3.0)
    flags = necessary_keys(attn, values)
    assert flags.shape == attn.shape
    assert flags.dtype == torch.bool
    for row, a in zip(flags, attn, strict=True):
        assert torch.equal(row, _linprog_necessary(a, values))
    # Every necessary key is in every vertex, so in the minimal row.
    assert not (flags & (minimal_attention(attn, values) == 0)).any()


def test_necessary_keys_respect_masks_and_full_rank_rows():
    attn, values = _problem(8, n=5, d=6, q=2)
    assert torch.equal(necessary_keys(attn, values), attn > 0)
    mask = torch.tensor([True, True, False, True, True])
    attn = attn * mask / (attn * mask).sum(-1, keepdim=True)
    assert not necessary_keys(attn, values, mask)[:, 2].any()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a, v: minimal_attention(a.numpy(), v), TypeError, "attn must be a torch.Tensor"),
        (lambda a, v: minimal_attention(a, v[:-1]), ValueError, "values must have shape"),
        (lambda a, v: minimal_attention(a * 2, v), ValueError, "sums to 2"),
        (lambda a, v: minimal_attention(a, v, tol=0), ValueError, "tol must be positive"),
        (lambda a, v: minimal_attention(a[:2], v, causal=True), ValueError, "q == n"),
        (
            lambda a, v: minimal_attention(a, v, torch.zeros(10, dtype=torch.bool)),
            ValueError,
            "masks every key",
        ),
        (lambda a, v: minimal_attention(a, v, backend="fortran"), ValueError, "backend must be"),
        (lambda a, v: necessary_keys(a, v.int()), TypeError, "floating-point"),
        (lambda a, v: necessary_keys(-a, v), ValueError, "negative entry"),
    ],
)
def test_bad_input(call, error, match):
    attn, values = _problem(9, n=10, d=3, q=3)
    with pytest.raises(error, match=match):
        call(attn, values)


@pytest.mark.slow
def test_real_minilm_cls_rows_against_highs(minilm_heads):  # noqa: F811
    """[CLS] rows of every head of MiniLM on a 256-token IMDB review: vertices of at most
    rank([1, V]) = 33 keys, the documented LP optimum by HiGHS, and the necessary keys of a few
    rows by one HiGHS LP per key."""
    attn = torch.stack([a[0, :, :1] for a, _ in minilm_heads])  # (6 layers, 12 heads, 1, 256)
    values = torch.stack([v[0] for _, v in minilm_heads])  # (6, 12, 256, 32)
    x, cert = minimal_attention(attn.double(), values.double(), return_certificate=True)
    assert cert.all_converged
    assert cert.max_output_error <= 1e-10
    single = minimal_attention(attn, values)  # the model's float32, the same vertices
    assert single.dtype == torch.float32
    assert torch.equal(single > 0, x > 0)
    efficient = efficient_attention(attn.double(), values.double())
    every_key = torch.ones(256, dtype=torch.bool)
    for layer in range(6):
        for head in range(12):
            row, a, v = x[layer, head, 0], attn[layer, head, 0], values[layer, head]
            _assert_vertex(row, a, v, every_key)
            assert int((row > 0).sum()) <= 33
            reference = _linprog_minimal(a.double(), v, efficient[layer, head, 0])
            np.testing.assert_allclose(row.double().numpy(), reference, atol=1e-5)
    flags = necessary_keys(attn[:2, :2], values[:2, :2])
    for layer in range(2):
        for head in range(2):
            a, v = attn[layer, head, 0].double(), values[layer, head].double()
            assert torch.equal(flags[layer, head, 0], _linprog_necessary(a, v))
