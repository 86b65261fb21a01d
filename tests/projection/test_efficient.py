"""Efficient attention: the properties the method page (docs/method.md) asks of it, checked
against independent solvers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_effattn import efficient_attention
from tests.projection.problems import attention_rows, head_output_error, value_vectors
from tests.reference import efficient_by_enumeration, efficient_by_slsqp


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize(("heads", "n", "d"), [(3, 40, 4), (2, 130, 16), (4, 256, 32)])
def test_rows_are_distributions_with_the_same_head_output(gen, heads, n, d):
    attn = attention_rows(heads, n, n, sharpness=2.0, generator=gen)
    values = value_vectors(heads, n, d, generator=gen)
    x, cert = efficient_attention(attn, values, return_certificate=True)
    assert x.shape == attn.shape
    assert x.dtype == attn.dtype
    assert (x >= 0).all()
    assert (x.sum(-1) - 1).abs().max() <= 1e-12
    assert head_output_error(x, attn, values).max() <= 1e-9
    assert cert.all_converged
    assert cert.output_error.shape == attn.shape[:-1]
    # n > d + 1: the constraint set is more than a point, and the projection moves the rows.
    assert (x - attn).abs().amax() > 1e-3


@pytest.mark.parametrize("solver", ["auto", "interior"])
@pytest.mark.parametrize("seed", range(12))
def test_matches_exhaustive_kkt_enumeration(solver, seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 5 + seed % 5, 1 + seed % 3
    attn = attention_rows(4, n, sharpness=1.0 + seed % 4, generator=g)
    values = value_vectors(n, d, generator=g)
    x = efficient_attention(attn, values, solver=solver)
    for row, a in zip(x, attn, strict=True):
        expected = efficient_by_enumeration(a.numpy(), values.numpy())
        np.testing.assert_allclose(row.numpy(), expected, atol=1e-9)


def test_matches_generic_qp_solver_on_moderate_rows(gen):
    n, d = 48, 6
    attn = attention_rows(6, n, sharpness=2.5, generator=gen)
    values = value_vectors(n, d, generator=gen)
    x = efficient_attention(attn, values)
    for row, a in zip(x, attn, strict=True):
        expected = efficient_by_slsqp(a.numpy(), values.numpy())
        # SLSQP is a generic solver: it stops near, not at, the optimum; ours has the smaller norm.
        np.testing.assert_allclose(row.numpy(), expected, atol=2e-6)
        assert float(row @ row) <= float(expected @ expected) + 1e-12


@pytest.mark.parametrize(("n", "d"), [(1, 4), (5, 4), (33, 32), (20, 64)])
def test_rows_come_back_unchanged_when_value_space_spans_all_keys(gen, n, d):
    attn = attention_rows(2, n, n, generator=gen)
    values = value_vectors(2, n, d, generator=gen)
    x, cert = efficient_attention(attn, values, return_certificate=True)
    assert torch.equal(x, attn)
    assert (cert.iterations == 0).all()


def test_any_row_with_the_same_output_maps_to_the_same_efficient_row(gen):
    """Uniqueness: the efficient row is a canonical representative of P(a)."""
    n, d = 60, 8
    attn = attention_rows(5, n, sharpness=2.0, generator=gen)
    values = value_vectors(n, d, generator=gen)
    x = efficient_attention(attn, values)
    for weight in (0.25, 0.5, 0.9):
        # Convex combinations of two members of P(a) are members of P(a).
        other = weight * attn + (1 - weight) * x
        assert head_output_error(other, attn, values).max() <= 1e-12
        torch.testing.assert_close(efficient_attention(other, values), x, atol=1e-10, rtol=0)


def test_idempotent(gen):
    attn = attention_rows(3, 80, 80, sharpness=2.0, generator=gen)
    values = value_vectors(3, 80, 12, generator=gen)
    x = efficient_attention(attn, values)
    torch.testing.assert_close(efficient_attention(x, values), x, atol=1e-10, rtol=0)


def test_permutation_of_keys_permutes_the_result(gen):
    attn = attention_rows(4, 70, sharpness=2.0, generator=gen)
    values = value_vectors(70, 10, generator=gen)
    perm = torch.randperm(70, generator=gen)
    x = efficient_attention(attn, values)
    x_perm = efficient_attention(attn[:, perm], values[perm])
    torch.testing.assert_close(x_perm, x[:, perm], atol=1e-10, rtol=0)


def test_has_no_larger_norm_than_the_input_or_any_feasible_mixture(gen):
    attn = attention_rows(8, 90, sharpness=3.0, generator=gen)
    values = value_vectors(90, 16, generator=gen)
    x = efficient_attention(attn, values)
    assert (x.norm(dim=-1) <= attn.norm(dim=-1) + 1e-12).all()


@pytest.mark.parametrize("solver", ["newton", "interior"])
def test_each_solver_alone_reaches_the_same_rows(gen, solver):
    attn = attention_rows(2, 50, 50, sharpness=2.0, generator=gen)
    values = value_vectors(2, 50, 6, generator=gen)
    reference = efficient_attention(attn, values)
    x, cert = efficient_attention(attn, values, solver=solver, return_certificate=True)
    assert cert.all_converged
    torch.testing.assert_close(x, reference, atol=1e-8, rtol=0)
