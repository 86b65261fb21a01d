"""Issue 18: no silent wrong answers and no NaN rows from the pure projections."""

from __future__ import annotations

import warnings

import pytest
import torch

from captum_effattn import effective_attention, efficient_attention
from captum_effattn.projection import (
    ConvergenceWarning,
    effective_attention_from_qk,
    efficient_attention_from_qk,
)
from captum_effattn.projection.basis import value_space_basis
from captum_effattn.projection.engine.grouped import GroupedMatrices
from captum_effattn.projection.solvers import interior
from captum_effattn.projection.solvers.interior import interior_point_phase


@pytest.fixture
def problem():
    """Two heads, 40 keys, d = 6, the last three keys padding: rows that must move."""
    g = torch.Generator().manual_seed(18)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[:, -3:] = False
    scores = 3 * torch.randn(2, 5, 40, generator=g, dtype=torch.float64)
    attn = scores.masked_fill(~key_mask[:, None], -torch.inf).softmax(-1)
    values = torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
    return attn, values, key_mask


SCALES = [1e-300, 1e-250, 1e-200, 1e-160, 1e-100, 1e-20, 1e20, 1e100, 1e160, 1e200, 1e250, 1e300]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("project", [efficient_attention, effective_attention])
def test_the_scale_of_the_values_does_not_change_the_rows(problem, project, scale):
    attn, values, key_mask = problem
    expected = project(attn, values, key_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning either
        x, certificate = project(attn, values * scale, key_mask, return_certificate=True)
    assert (expected - attn).abs().max() > 0.05  # the rows do move: a real test
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-11)
    assert certificate.all_converged
    assert 0 < certificate.max_output_error <= 1e-12  # measured, not an underflowed 0


def test_the_certificate_error_is_relative_at_any_scale(problem):
    """A wrong row is reported as wrong, whatever the scale: the error is not 0 by underflow."""
    attn, values, key_mask = problem
    for scale in (1e-200, 1.0, 1e200):
        _x, certificate = effective_attention(
            attn, values * scale, key_mask, return_certificate=True
        )
        assert certificate.max_output_error <= 1e-12
    with pytest.warns(ConvergenceWarning):
        _, certificate = efficient_attention(
            attn,
            values * 1e-200,
            key_mask,
            return_certificate=True,
            max_newton_iter=0,
            solver="newton",
        )
    assert not certificate.all_converged
    assert certificate.max_output_error > 1e-3


def _nan_interior(*args, **kwargs):
    x, iterations, converged = interior_point_phase(*args, **kwargs)
    return torch.full_like(x, torch.nan), iterations, torch.zeros_like(converged)


def test_a_failed_interior_point_never_makes_a_nan_row(problem, monkeypatch):
    """The interior point breaking down leaves Newton's iterate, or else the input row itself
    (valid but not projected), and the certificate says so."""
    attn, values, key_mask = problem
    monkeypatch.setattr("captum_effattn.projection.efficient.interior_point_phase", _nan_interior)
    with pytest.warns(ConvergenceWarning):
        x, certificate = efficient_attention(
            attn, values, key_mask, solver="interior", return_certificate=True
        )
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, attn)
    assert not certificate.converged.any()
    # With a few Newton steps first, their iterate is kept: finite, a distribution.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        x = efficient_attention(attn, values, key_mask, max_newton_iter=2, backend="torch")
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_the_interior_point_stops_at_its_gap_floor():
    """Asked for a residual below rounding, the interior point used to iterate on until its
    iterate underflowed and broke down (NaN rows on real near-one-hot rows); it stops once the
    duality gap is resolved, and the crossover finishes the row."""
    g = torch.Generator().manual_seed(4)
    values = torch.randn(1, 40, 8, generator=g, dtype=torch.float64)
    logits = 2 * torch.randn(1, 40, generator=g, dtype=torch.float64)
    logits[0, 7] += 10  # near one-hot: max weight ~0.9999
    a = logits.softmax(-1)
    mask = torch.ones(1, 40, dtype=torch.bool)
    basis, _ = value_space_basis(values, mask, with_ones=True)
    ops = GroupedMatrices(basis, torch.zeros(1, dtype=torch.long))
    c = ops.right(a)
    dead = torch.zeros(1, basis.shape[-1], dtype=torch.bool)
    x, iterations, converged = interior_point_phase(ops, c, mask, dead, 200, 1e-17)
    assert int(iterations[0]) < 200
    assert not bool(converged[0])  # 1e-17 is below rounding: honestly not converged
    assert torch.isfinite(x).all()
    assert (x >= 0).all()
    assert float((ops.right(x) - c).norm()) <= 1e-12
    assert interior.GAP_FRACTION == 1e-8


# --- errors and empty inputs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("max_newton_iter", -1, r"max_newton_iter must be an int >= 0"),
        ("max_interior_iter", -5, r"max_interior_iter must be an int >= 0"),
        ("rank_rtol", -1e-9, r"rank_rtol must be in \[0, 1\)"),
        ("rank_rtol", 1.0, r"rank_rtol must be in \[0, 1\)"),
        ("rank_rtol", float("nan"), r"rank_rtol must be in \[0, 1\)"),
        ("distribution_tol", 0.0, r"distribution_tol must be in \(0, 1\)"),
        ("distribution_tol", -1e-3, r"distribution_tol must be in \(0, 1\)"),
        ("distribution_tol", 2.0, r"distribution_tol must be in \(0, 1\)"),
        ("tol", float("inf"), r"tol must be positive and finite"),
    ],
)
def test_bad_numeric_options_name_the_option(problem, option, value, expected):
    attn, values, key_mask = problem
    with pytest.raises(ValueError, match=expected):
        efficient_attention(attn, values, key_mask, **{option: value})


@pytest.mark.parametrize(
    ("option", "value"), [("max_newton_iter", 2.5), ("max_newton_iter", True), ("tol", "1e-9")]
)
def test_options_of_the_wrong_type_name_the_option(problem, option, value):
    attn, values, key_mask = problem
    with pytest.raises(TypeError, match=option):
        efficient_attention(attn, values, key_mask, **{option: value})


def test_effective_attention_checks_its_options(problem):
    attn, values, key_mask = problem
    with pytest.raises(ValueError, match=r"rank_rtol must be in \[0, 1\)"):
        effective_attention(attn, values, key_mask, rank_rtol=-1.0)
    with pytest.raises(ValueError, match=r"tol must be positive"):
        effective_attention(attn, values, key_mask, tol=-1.0)


@pytest.mark.parametrize("project", [efficient_attention, effective_attention])
def test_mass_on_masked_keys_is_an_error_in_both_projections(problem, project):
    attn, values, key_mask = problem
    leaky = attn.clone()
    leaky[1, 2, -1] = 0.25
    leaky[1, 2] /= leaky[1, 2].sum()
    with pytest.raises(
        ValueError, match=r"attn row at index \[1, 2\].*mass 0\.2 on masked \(padding or future\)"
    ):
        project(leaky, values, key_mask)


@pytest.mark.parametrize("project", [efficient_attention, effective_attention])
def test_values_of_width_zero(problem, project):
    attn, values, key_mask = problem
    with pytest.raises(ValueError, match=r"values must have at least one feature \(d >= 1\)"):
        project(attn, values[..., :0], key_mask)


@pytest.mark.parametrize("project", [efficient_attention, effective_attention])
def test_no_keys(project):
    with pytest.raises(ValueError, match=r"at least one key \(n >= 1\)"):
        project(torch.zeros(2, 3, 0), torch.zeros(2, 0, 4))


@pytest.mark.parametrize("project", [efficient_attention, effective_attention])
@pytest.mark.parametrize("empty", ["batch", "rows", "both"])
def test_empty_batches_give_empty_results(problem, project, empty):
    attn, values, key_mask = problem
    if empty in ("batch", "both"):
        attn, values, key_mask = attn[:0], values[:0], key_mask[:0]
    if empty in ("rows", "both"):
        attn = attn[:, :0]
    x, certificate = project(attn, values, key_mask, return_certificate=True)
    assert x.shape == attn.shape
    assert x.dtype == attn.dtype
    for field in ("output_error", "simplex_violation", "iterations", "converged"):
        assert getattr(certificate, field).shape == attn.shape[:-1]
    assert certificate.all_converged
    assert certificate.summary() == "0 rows"


@pytest.mark.parametrize("project", [efficient_attention_from_qk, effective_attention_from_qk])
def test_empty_batches_from_queries_and_keys(project):
    g = torch.Generator().manual_seed(0)
    query, key, values = (torch.randn(2, 2, 10, 4, generator=g) for _ in range(3))
    assert project(query[:0], key[:0], values[:0]).shape == (0, 2, 10, 10)
    assert project(query, key, values, rows=[]).shape == (2, 2, 0, 10)
    x, certificate = project(query[:0], key[:0], values[:0], rows=0, return_certificate=True)
    assert x.shape == (0, 2, 1, 10)
    assert certificate.converged.shape == (0, 2, 1)
    with pytest.raises(ValueError, match=r"values must have at least one feature \(d_v >= 1\)"):
        project(query, key, values[..., :0])
    with pytest.raises(ValueError, match=r"query and key must have d_k >= 1"):
        project(query[..., :0], key[..., :0], values)
    with pytest.raises(ValueError, match=r"at least one head"):
        project(query[:, :0], key[:, :0], values[:, :0])
