"""Compiled Newton in the coordinates of ``[1, V]``: the steps of the orthonormal route, no bases,
and every row it leaves out still solved by the general path."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings

from captum_effattn import efficient_attention
from captum_effattn.projection.basis import value_space_basis
from captum_effattn.projection.engine.grouped import GroupedMatrices
from captum_effattn.projection.solvers.compiled_newton import (
    compiled_newton_phase,
    compiled_value_newton,
    numba_available,
)
from tests.projection.problems import (
    attention_rows,
    grouped_problem_shapes,
    grouped_rows_problem,
    head_output_error,
    value_vectors,
)

pytestmark = pytest.mark.skipif(not numba_available(), reason="needs the numba extra")


def _output_error(x, a, values):
    """``||x V - a V|| / ||a V||`` per row, each row with its own ``V`` (``(R, n, d)``)."""
    return head_output_error(x[:, None], a[:, None], values)[:, 0]


@settings(max_examples=30, deadline=None)
@given(shape=grouped_problem_shapes(max_rows_per_group=5, max_n=70))
def test_same_steps_and_rows_as_newton_on_an_orthonormal_basis(shape):
    d = shape[3]
    values, key_mask, group, a = grouped_rows_problem(*shape)
    x, steps, solved, error = compiled_value_newton(values, key_mask, group, a, 200, 1e-13)
    assert (error[solved] <= 1e-10).all()
    assert (error[~solved] == 0).all()
    real = key_mask[group].sum(-1)
    # Rows whose keys do not outnumber [1, V]'s columns are the general path's (maybe unchanged).
    assert not solved[real <= d + 1].any()
    assert solved[real > d + 1].all()  # random Gaussian values: well conditioned
    basis, _ = value_space_basis(values, key_mask, with_ones=True)
    ops = GroupedMatrices(basis, group)
    c = ops.right(a)
    theta, steps_b, converged_b = compiled_newton_phase(ops, c, c.clone(), 200, 1e-13)
    x_b = ops.left(theta).clamp_min(0)
    assert converged_b[solved].all()
    assert ((steps - steps_b).abs() <= 1)[solved].all()
    torch.testing.assert_close(x[solved], x_b[solved], atol=1e-11, rtol=0)
    assert (x[~solved] == 0).all()
    # A solution: non-negative, the same head output (and sum) as a.
    if solved.any():
        x_s = x[solved] / x[solved].sum(-1, keepdim=True)
        assert _output_error(x_s, a[solved], values[group[solved]]).max() <= 1e-10
        assert (x_s[~key_mask[group[solved]]] == 0).all()


def _against_torch(attn, values, key_mask=None):
    x_numba, cert = efficient_attention(
        attn, values, key_mask, backend="numba", return_certificate=True
    )
    x_torch = efficient_attention(attn, values, key_mask, backend="torch")
    assert cert.all_converged
    torch.testing.assert_close(x_numba, x_torch, atol=1e-10, rtol=0)
    return x_numba


def test_rank_deficient_and_ill_conditioned_heads_go_to_the_general_path():
    gen = torch.Generator().manual_seed(3)
    n, d = 40, 6
    values = value_vectors(4, n, d, generator=gen)
    values[1, :, 5] = values[1, :, 4]  # rank deficient: two equal columns
    values[2, :, 5] = values[2, :, 4] + 1e-7 * values[2, :, 3]  # nearly so
    values[3, :, 0] = 2.5  # a column parallel to the all-ones column
    attn = attention_rows(4 * 3, n, sharpness=3.0, generator=gen).reshape(4, 3, n)
    key_mask = torch.ones(4, n, dtype=torch.bool)
    rows = attn.reshape(-1, n) / attn.reshape(-1, n).sum(-1, keepdim=True)
    _, _, solved, _ = compiled_value_newton(
        values, key_mask, torch.arange(4).repeat_interleave(3), rows, 200, 1e-13
    )
    assert solved.tolist() == [True] * 3 + [False] * 9
    # One call mixes both routes: each row lands where it belongs.
    x = _against_torch(attn, values)
    assert _output_error(x.reshape(-1, n), rows, values.repeat_interleave(3, 0)).max() <= 1e-9


def test_short_and_padded_rows_next_to_long_ones():
    gen = torch.Generator().manual_seed(5)
    n, d = 30, 4
    values = value_vectors(3, n, d, generator=gen)
    key_mask = torch.ones(3, n, dtype=torch.bool)
    key_mask[1, 5:] = False  # 5 real keys = d + 1: identifiable, returned unchanged
    key_mask[2, 3:] = False  # fewer real keys than columns
    attn = attention_rows(3, n, sharpness=2.0, generator=gen) * key_mask
    attn = (attn / attn.sum(-1, keepdim=True))[:, None]
    x = _against_torch(attn, values, key_mask)
    torch.testing.assert_close(x[1:], attn[1:], atol=1e-15, rtol=0)
    assert (x[0] - attn[0]).abs().max() > 1e-3


def test_the_kernels_output_error_is_the_certificates():
    """The error the kernel measures for each solved row is ``||x V - a V|| / ||a V||`` over the
    row's keys, whatever the values' scale and dtype (float32 is read as given): here on rows far
    from each other (large errors), from the unit columns of ``[1, V]`` the solver works with."""
    import numpy as np

    from captum_effattn.projection.solvers import newton_kernels

    gen = torch.Generator().manual_seed(11)
    n, d = 25, 5
    values = value_vectors(1, n, d, generator=gen)[0] * 3e7
    key_mask = torch.ones(n, dtype=torch.bool)
    key_mask[20:] = False
    a, x = attention_rows(2, n, sharpness=2.0, generator=gen).double() * key_mask
    a, x = a / a.sum(), x / x.sum()
    expected = float(head_output_error(x[None], a[None], values)[0])
    assert expected > 0.1
    for as_given in (values, values.float()):
        matrix, norms, gram = np.empty((n, d + 1)), np.empty(d), np.empty((d + 1, d + 1))
        assert newton_kernels.unit_columns(
            as_given.numpy(), key_mask.numpy(), matrix, norms, gram, np.empty((d + 1, n))
        )
        # Its Gram matrix is that of the unit columns it returns.
        np.testing.assert_allclose(np.tril(gram), np.tril(matrix.T @ matrix), atol=1e-14)
        coordinates = np.empty(d + 1)
        newton_kernels.columns_times(matrix, a.numpy(), coordinates)
        measured = newton_kernels.output_error_of_row(
            matrix, norms, x.numpy(), a.numpy(), coordinates, np.empty(n), np.empty(d + 1)
        )
        tolerance = 1e-6 if as_given.dtype == torch.float32 else 1e-12
        assert measured == pytest.approx(expected, rel=tolerance)


def test_float32_values_and_key_prefixes_solve_as_their_float64_and_masked_forms():
    """Float32 values (read as given) take the same steps as their float64 copy, bit for bit;
    a row limited to the keys before ``prefix`` is the row of the key mask cut there."""
    values, key_mask, group, rows = grouped_rows_problem(3, 4, 40, 5, 2, seed=8)
    values = values.float()
    as_given = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13)
    widened = compiled_value_newton(values.double(), key_mask, group, rows, 200, 1e-13)
    assert as_given.solved.all()
    for one, other in zip(as_given, widened, strict=True):
        assert torch.equal(one, other)
    prefix = torch.tensor([40, 30, 20, 12] * 3)
    cut = key_mask[group] & (torch.arange(40) < prefix[:, None])
    rows_cut = rows * cut
    rows_cut = rows_cut / rows_cut.sum(-1, keepdim=True)
    by_prefix = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13, prefix)
    by_mask = compiled_value_newton(values[group], cut, torch.arange(12), rows_cut, 200, 1e-13)
    assert by_prefix.solved.all()
    assert torch.equal(by_prefix.solved, by_mask.solved)
    assert (by_prefix.iterations - by_mask.iterations).abs().max() <= 1  # rows normalized apart
    assert (by_prefix.x[~cut] == 0).all()
    torch.testing.assert_close(by_prefix.x, by_mask.x, atol=1e-13, rtol=0)
    torch.testing.assert_close(by_prefix.output_error, by_mask.output_error, atol=1e-14, rtol=0)


@pytest.mark.parametrize("scale", [1e-120, 1e120])
def test_values_beyond_the_kernels_range_are_solved_by_the_general_path(scale):
    """Values whose squares would leave float64's range are not read by the kernel as given: the
    general path (which rescales them) solves those rows, to the rows of the unscaled values."""
    gen = torch.Generator().manual_seed(9)
    n, d = 30, 4
    values = value_vectors(2, n, d, generator=gen)
    attn = attention_rows(2, 2, n, sharpness=2.0, generator=gen)
    key_mask = torch.ones(2, n, dtype=torch.bool)
    assert not compiled_value_newton(
        values * scale, key_mask, torch.tensor([0, 0, 1, 1]), attn.reshape(4, n), 200, 1e-13
    ).solved.any()
    unscaled = _against_torch(attn, values)
    scaled, cert = efficient_attention(
        attn, values * scale, backend="numba", return_certificate=True
    )
    assert cert.all_converged
    torch.testing.assert_close(scaled, unscaled, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale", [1e-160, 1e-90])
def test_one_column_far_below_the_others(scale):
    """The kernel sums products of the values as given: a column whose products would underflow
    (1e-160: squares near 1e-320) leaves the row to the general path, one inside the range
    (1e-90) is solved by the kernel; either way the rows are those of the column at scale 1
    (efficient rows do not depend on a column's scale: the same span)."""
    gen = torch.Generator().manual_seed(21)
    n, d = 30, 4
    values = value_vectors(1, n, d, generator=gen)
    attn = attention_rows(1, 2, n, sharpness=2.0, generator=gen)
    key_mask = torch.ones(1, n, dtype=torch.bool)
    scaled_values = values.clone()
    scaled_values[..., 2] *= scale
    kernel = compiled_value_newton(
        scaled_values, key_mask, torch.tensor([0, 0]), attn.reshape(2, n), 200, 1e-13
    )
    if scale > 1e-100:
        assert kernel.solved.all()
    else:
        assert not kernel.solved.any()
    unscaled = _against_torch(attn, values)
    scaled, cert = efficient_attention(
        attn, scaled_values, backend="numba", return_certificate=True
    )
    assert cert.all_converged
    torch.testing.assert_close(scaled, unscaled, atol=1e-10, rtol=0)


def test_rows_are_written_into_a_given_output_in_place():
    """The driver hands its own output over (every row of a large problem has no second copy):
    the rows land in it, the same as in a new one; an output of another dtype, shape, layout or
    device is refused, saying what it got."""
    values, key_mask, group, rows = grouped_rows_problem(3, 4, 40, 5, 2, seed=12)
    fresh = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13)
    out = torch.zeros_like(rows)
    given = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13, out=out)
    assert given.x.data_ptr() == out.data_ptr()
    for one, other in zip(fresh, given, strict=True):
        assert torch.equal(one, other)
    wrong = {
        "torch.float32": out.float(),
        r"shape \(12, 39\)": out[:, 1:].contiguous(),
        "a non-contiguous": torch.zeros(rows.shape[::-1], dtype=torch.float64).T,
        "on meta": torch.zeros_like(rows, device="meta"),
    }
    for got, given_out in wrong.items():
        with pytest.raises(ValueError, match=r"contiguous float64 CPU tensor of shape") as error:
            compiled_value_newton(values, key_mask, group, rows, 200, 1e-13, out=given_out)
        assert re.search(got, str(error.value)), str(error.value)
