"""Effective attention (Brunner et al. 2020): orthogonal projection onto the value space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_effattn import effective_attention
from captum_effattn.projection.effective import _by_normal_equations
from captum_effattn.projection.engine.backends import BACKENDS
from captum_effattn.projection.engine.layout import Chunk
from tests.projection.problems import (
    attention_rows,
    grouped_problem_shapes,
    head_output_error,
    value_vectors,
)
from tests.reference import effective_by_lstsq


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1)


def test_is_the_minimum_norm_row_with_the_same_output(gen):
    attn = attention_rows(6, 50, sharpness=2.0, generator=gen)
    values = value_vectors(50, 7, generator=gen)
    x, cert = effective_attention(attn, values, return_certificate=True)
    for row, a in zip(x, attn, strict=True):
        np.testing.assert_allclose(
            row.numpy(), effective_by_lstsq(a.numpy(), values.numpy()), atol=1e-12
        )
    assert head_output_error(x, attn, values).max() <= 1e-12
    assert cert.all_converged


def test_is_not_a_distribution_on_long_inputs(gen):
    """Why efficient attention exists: effective rows go negative and do not sum to one."""
    attn = attention_rows(4, 128, 128, sharpness=2.0, generator=gen)
    values = value_vectors(4, 128, 16, generator=gen)
    x, cert = effective_attention(attn, values, return_certificate=True)
    assert (x < 0).float().mean() > 0.1
    assert (x.sum(-1) - 1).abs().max() > 1e-2
    assert cert.simplex_violation.max() > 1e-2


def test_idempotent_and_identity_on_short_inputs(gen):
    attn = attention_rows(3, 60, 60, generator=gen)
    values = value_vectors(3, 60, 9, generator=gen)
    x = effective_attention(attn, values)
    torch.testing.assert_close(effective_attention(x, values), x, atol=1e-12, rtol=0)
    short = attention_rows(3, 8, 8, generator=gen)
    torch.testing.assert_close(
        effective_attention(short, value_vectors(3, 8, 9, generator=gen)), short
    )


def test_causal_rows_never_move_mass_onto_future_keys(gen):
    n, d = 40, 5
    attn = attention_rows(2, n, n, generator=gen).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    values = value_vectors(2, n, d, generator=gen)
    x = effective_attention(attn, values, causal=True)
    assert (x.triu(1) == 0).all()
    for i in (3, 17, n - 1):
        prefix = effective_attention(attn[:, i : i + 1, : i + 1], values[:, : i + 1])
        torch.testing.assert_close(x[:, i : i + 1, : i + 1], prefix, atol=1e-12, rtol=0)


def _hard_problem(shape, causal: bool, duplicate: bool, spread: float):
    """Attention rows ``(G, n, n)``, values ``(G, n, d)`` (float64) and key mask ``(G, n)`` of a
    :func:`grouped_problem_shapes` shape: the second value column a duplicate of the first or
    ``spread`` away from it, padding at the end, causal rows when asked."""
    groups, _, n, d, padded, seed = shape
    gen = torch.Generator().manual_seed(seed)
    values = value_vectors(groups, n, d, generator=gen)
    if d > 1:
        values[..., 1] = values[..., 0] + spread * values[..., 1] * (not duplicate)
    key_mask = torch.ones(groups, n, dtype=torch.bool)
    key_mask[:, n - padded :] = False
    hidden = ~key_mask[:, None, :]
    if causal:
        hidden = hidden | torch.ones(n, n, dtype=torch.bool).triu(1)
    scores = 2 * torch.randn(groups, n, n, generator=gen, dtype=torch.float64)
    attn = torch.softmax(scores.masked_fill(hidden, -torch.inf), -1).nan_to_num()
    return attn, values, key_mask


# The arguments of _hard_problem, drawn.
HARD_PROBLEMS = {
    "shape": grouped_problem_shapes(max_n=50),
    "causal": st.booleans(),
    "duplicate": st.booleans(),
    "spread": st.sampled_from([1.0, 1e-4, 1e-9]),
}


@settings(max_examples=30, deadline=None)
@given(**HARD_PROBLEMS)
def test_the_normal_equations_agree_with_an_orthonormal_basis(shape, causal, duplicate, spread):
    """The route without a basis (well-conditioned heads) gives the rows of the route with one,
    and leaves the rest to it: exact duplicate columns (rank-deficient values), columns nearly
    dependent (``spread``), fewer keys than columns, causal prefixes."""
    attn, values, key_mask = _hard_problem(shape, causal, duplicate, spread)
    n, d = values.shape[-2:]
    x, report = effective_attention(attn, values, key_mask, causal, return_certificate=True)
    # A rank tolerance of the caller's own (here the default's value) always builds bases.
    rtol = max(n, d) * torch.finfo(torch.float64).eps
    y, basis_report = effective_attention(
        attn, values, key_mask, causal, return_certificate=True, rank_rtol=rtol
    )
    torch.testing.assert_close(x, y, atol=1e-9, rtol=0)
    assert torch.equal(report.converged, basis_report.converged)
    assert report.output_error.max() <= max(1e-10, float(basis_report.output_error.max()))


def test_the_normal_equations_take_the_well_conditioned_heads(gen):
    """Which heads the route without a basis keeps: all but the one with dependent columns, and
    its rows there are the basis route's."""
    values = value_vectors(3, 40, 6, generator=gen)
    values[2, :, 1] = values[2, :, 0]
    key_mask = torch.ones(3, 40, dtype=torch.bool)
    group = torch.arange(3).repeat_interleave(4)
    rows = attention_rows(12, 40, sharpness=2.0, generator=gen)
    chunk = Chunk(torch.arange(12), rows, group, values, key_mask)
    result, kept = _by_normal_equations(chunk, rows, BACKENDS["torch"])
    assert torch.equal(kept, group != 2)
    reference = effective_attention(rows[:8].reshape(2, 4, 40), values[:2])
    torch.testing.assert_close(result.rows[:8].reshape(2, 4, 40), reference, atol=1e-12, rtol=0)
    assert float(result.error[:8].max()) <= 1e-13


def test_the_normal_equations_leave_groups_with_no_more_keys_than_columns():
    """Two keys under two full-rank value columns: the projection is the identity, and the row
    must come back as it is, not rounded through ``G^{-1}`` (found by hypothesis on a causal
    prefix: these nearly parallel values returned a row 1.4e-12 longer than the row itself)."""
    values = torch.tensor(
        [[-2.443815470299606, -1.297255217940803], [-0.45697889431084093, -0.257096041633557]],
        dtype=torch.float64,
    )
    a = torch.tensor([[0.47217079780351084, 0.5278292021964892]], dtype=torch.float64)
    x = effective_attention(a, values)
    torch.testing.assert_close(x, a, atol=1e-15, rtol=0)
    assert float(x.norm() - a.norm()) <= 1e-15
    chunk = Chunk(torch.arange(1), a, torch.zeros(1, dtype=torch.long), values[None], a > 0)
    _, kept = _by_normal_equations(chunk, a, BACKENDS["torch"])
    assert not kept.any()
    # One key more, and the route takes the row.
    longer = torch.cat([values, torch.tensor([[1.0, -1.0]], dtype=torch.float64)])
    b = torch.tensor([[0.3, 0.3, 0.4]], dtype=torch.float64)
    chunk = Chunk(torch.arange(1), b, torch.zeros(1, dtype=torch.long), longer[None], b > 0)
    _, kept = _by_normal_equations(chunk, b, BACKENDS["torch"])
    assert kept.all()


numba_only = pytest.mark.skipif(
    BACKENDS["numba"].unavailable_reason(torch.device("cpu")) is not None,
    reason="needs the numba extra",
)


@numba_only
@settings(max_examples=30, deadline=None)
@given(**HARD_PROBLEMS, single=st.booleans())
def test_the_compiled_projection_agrees_with_pytorch(shape, causal, duplicate, spread, single):
    """The compiled route (``backend="numba"``: the projection on ``V`` itself, row by row) gives
    the rows and certificate of the batched PyTorch route, values in float32 or float64, and
    leaves what it does not take (dependent columns, no more keys than columns) to the bases."""
    attn, values, key_mask = _hard_problem(shape, causal, duplicate, spread)
    if single:
        values = values.float()
    compiled, report = effective_attention(
        attn, values, key_mask, causal, return_certificate=True, backend="numba"
    )
    batched, batched_report = effective_attention(
        attn, values, key_mask, causal, return_certificate=True, backend="torch"
    )
    torch.testing.assert_close(compiled, batched, atol=1e-9, rtol=0)
    assert torch.equal(report.converged, batched_report.converged)
    assert report.output_error.max() <= max(1e-10, float(batched_report.output_error.max()))


@numba_only
def test_the_compiled_projection_takes_the_well_conditioned_heads(gen):
    """Which heads the kernel projects: those with more real keys than columns and independent
    columns (not the duplicate one, not the short one), each within rounding of the reference."""
    from captum_effattn.projection.solvers.compiled_newton import compiled_value_projection

    values = value_vectors(4, 40, 6, generator=gen)
    values[2, :, 1] = values[2, :, 0]
    key_mask = torch.ones(4, 40, dtype=torch.bool)
    key_mask[3, 6:] = False  # six real keys under six columns
    source = torch.arange(4).repeat_interleave(3)
    rows = attention_rows(12, 40, sharpness=2.0, generator=gen)
    x, iterations, solved, error = compiled_value_projection(values, key_mask, source, rows)
    assert torch.equal(solved, source < 2)
    assert not iterations.any()
    for row in range(6):
        reference = effective_by_lstsq(rows[row].numpy(), values[source[row]].numpy())
        np.testing.assert_allclose(x[row].numpy(), reference, atol=1e-12, rtol=0)
    assert float(error[:6].max()) <= 1e-13
    assert not x[6:].any()  # rows not taken are left as zeros for the general route
