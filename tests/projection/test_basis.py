"""Orthonormal bases of value spaces: both factorization paths, ranks and padding."""

from __future__ import annotations

import pytest
import torch

from captum_effattn.projection import orthonormal_basis


def _check_spans(basis, rank, matrix, mask):
    """Orthonormal live columns, zero dead columns and padding rows, same column space."""
    for b, r, m, keys in zip(basis, rank, matrix, mask, strict=True):
        live = b[:, :r]
        torch.testing.assert_close(
            live.T @ live, torch.eye(int(r), dtype=torch.float64), atol=1e-12, rtol=0
        )
        assert (b[:, r:] == 0).all()
        assert (b[~keys] == 0).all()
        m = m * keys[:, None]
        torch.testing.assert_close(live @ (live.T @ m), m, atol=1e-10, rtol=0)


def test_well_conditioned_full_rank():
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(5, 40, 9, generator=g, dtype=torch.float64)
    mask = torch.ones(5, 40, dtype=torch.bool)
    basis, rank = orthonormal_basis(matrix, mask)
    assert (rank == 9).all()
    _check_spans(basis, rank, matrix, mask)


def test_rank_deficient_and_ill_conditioned_take_the_careful_path():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 9, generator=g, dtype=torch.float64
    )
    ill = torch.randn(40, 9, generator=g, dtype=torch.float64)
    outside = torch.randn(40, generator=g, dtype=torch.float64)  # not in the columns' span
    # Condition number ~1e9: full rank, but too ill-conditioned for Cholesky QR.
    ill[:, 8] = ill[:, 7] + 1e-9 * outside
    zero = torch.randn(40, 9, generator=g, dtype=torch.float64)
    zero[:, 4] = 0
    matrix = torch.stack([low, ill, zero])
    basis, rank = orthonormal_basis(matrix, torch.ones(3, 40, dtype=torch.bool))
    assert rank.tolist() == [3, 9, 8]
    _check_spans(basis, rank, matrix, torch.ones(3, 40, dtype=torch.bool))


@pytest.mark.parametrize("real", [3, 12, 40])
def test_padding_rows_are_exactly_zero_and_limit_the_rank(real):
    g = torch.Generator().manual_seed(2)
    matrix = torch.randn(2, 40, 9, generator=g, dtype=torch.float64)
    mask = torch.arange(40).expand(2, 40) < real
    basis, rank = orthonormal_basis(matrix, mask)
    assert (rank == min(real, 9)).all()
    _check_spans(basis, rank, matrix, mask)


def test_rank_tolerance_is_relative_to_the_largest_singular_value():
    g = torch.Generator().manual_seed(3)
    matrix = torch.randn(1, 30, 4, generator=g, dtype=torch.float64)
    outside = torch.randn(30, generator=g, dtype=torch.float64)
    matrix[..., 3] = matrix[..., 2] + 1e-7 * outside
    assert orthonormal_basis(matrix, torch.ones(1, 30, dtype=torch.bool))[1].item() == 4
    loose = orthonormal_basis(matrix, torch.ones(1, 30, dtype=torch.bool), rtol=1e-5)[1]
    assert loose.item() == 3


def test_fewer_keys_than_columns_span_every_key_unless_the_keys_are_dependent():
    """Short inputs: well-conditioned keys span all of them (certified by a bound on their
    rows' condition number), padded ones on their real keys; dependent and nearly dependent
    keys take the careful path."""
    g = torch.Generator().manual_seed(4)
    well = torch.randn(6, 9, generator=g, dtype=torch.float64)
    repeated = well.clone()
    repeated[5] = repeated[2]  # two keys with the same row: rank 5
    near = well.clone()
    # Keys 4 and 5 nearly the same (condition ~1e9): full rank, too ill-conditioned to certify.
    near[5] = near[4] + 1e-9 * torch.randn(9, generator=g, dtype=torch.float64)
    matrix = torch.stack([well, repeated, near, well])
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[3, 4:] = False
    basis, rank = orthonormal_basis(matrix, mask)
    assert basis.shape == (4, 6, 6)
    assert rank.tolist() == [6, 5, 6, 4]
    _check_spans(basis, rank, matrix, mask)
    # Spanning every key, the basis projects any row onto itself.
    rows = torch.rand(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(basis[0] @ (basis[0].T @ rows), rows, atol=1e-14, rtol=0)


def test_padded_groups_with_fewer_real_keys_than_columns_beside_long_ones():
    """A padded batch of short and long inputs: each group is judged on its own real keys,
    wherever the padding lies, and its basis spans exactly them."""
    g = torch.Generator().manual_seed(5)
    n, k = 20, 9
    matrix = torch.randn(7, n, k, generator=g, dtype=torch.float64)
    positions = torch.arange(n)
    mask = torch.stack(
        [
            positions < n,  # long: every key real
            positions < 5,  # right padding
            positions >= n - 6,  # left padding
            positions < 7,  # two real keys with the same row below: rank 6
            positions % 3 == 0,  # scattered real keys, 7 of them
            positions < 8,  # 8 keys, two nearly dependent: full rank, the careful path
            positions < 0,  # no real key at all
        ]
    )
    matrix[3, 6] = matrix[3, 1]
    matrix[5, 7] = matrix[5, 2] + 1e-9 * torch.randn(k, generator=g, dtype=torch.float64)
    basis, rank = orthonormal_basis(matrix, mask)
    assert basis.shape == (7, n, k)
    assert rank.tolist() == [9, 5, 6, 6, 7, 8, 0]
    _check_spans(basis, rank, matrix, mask)
