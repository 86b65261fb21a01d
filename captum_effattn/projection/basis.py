"""Orthonormal bases of value spaces, with rank decided by a relative tolerance in float64."""

from __future__ import annotations

from typing import NamedTuple

import torch

from captum_effattn._typing import KeyMask, RowBases

# CholeskyQR2 is trusted when its first pass is orthonormal to this accuracy, i.e. when the
# columns' condition number is below ~1e6: far inside the rank tolerance, so such a matrix has full
# column rank under any tolerance we use. Everything else goes through Householder QR + SVD.
CHOLESKY_ORTHOGONALITY = 1e-4
# A first pass this close to orthonormal (largest entry of B^T B - I) needs no second.
ORTHONORMAL_AFTER_ONE_PASS = 1e-13
# ``||L^{-1}||_F`` above which unit columns (``[V]`` or ``[1, V]``, Gram ``L L^T``) go to the
# orthonormal route instead of working with their Gram matrix: rounding errors grow with it, and
# 1e3 keeps them near 1e-14 against the 1e-13 tolerance of the compiled Newton phase. MiniLM's
# heads sit far below (12-20 on a 256-token review; no head is refused in
# tests/projection/test_real_minilm.py).
MAX_INVERSE_NORM = 1e3


def _right_inverse_transpose(matrix: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``matrix @ factor^{-T}`` for the Cholesky factor ``L`` of ``G = L L^T``, as
    ``matrix @ (G^{-1} L)``: batched triangular solves of many small matrices are slow on CPU,
    the Cholesky inverse and two products are not. The
    second pass of CholeskyQR2 runs on a near-identity Gram, where both are exact to rounding."""
    return matrix @ (torch.cholesky_inverse(factor) @ factor)


class _CholeskyPass(NamedTuple):
    """One pass of Cholesky QR over ``(G, n, k)`` columns."""

    basis: torch.Tensor  # (G, n, k) the columns times L^{-T}: orthonormal up to rounding
    gram: torch.Tensor  # (G, k, k) its Gram matrix
    orthogonality: torch.Tensor  # (G,) largest entry of gram - I
    trusted: torch.Tensor  # (G,) bool: well conditioned (full column rank under any tolerance)


def _cholesky_pass(matrix: torch.Tensor) -> _CholeskyPass:
    """The first pass of Cholesky QR, and whether it is trusted (see
    :data:`CHOLESKY_ORTHOGONALITY`)."""
    gram = matrix.mT @ matrix
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    factor = torch.where((info == 0)[:, None, None], factor, identity)
    first = _right_inverse_transpose(matrix, factor)
    gram = first.mT @ first
    orthogonality = (gram - identity).abs().amax((-2, -1))
    trusted = (info == 0) & (orthogonality <= CHOLESKY_ORTHOGONALITY)
    return _CholeskyPass(first, gram, orthogonality, trusted)


def _cholesky_qr2(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two passes of Cholesky QR; returns ``(basis, trusted)`` with ``trusted`` per group.

    The second pass is skipped when the first already gives orthonormal columns to
    :data:`ORTHONORMAL_AFTER_ONE_PASS` in every group (well-conditioned columns: MiniLM's value
    heads have condition numbers of 4-23, and the first pass leaves errors of 1e-15 to 4e-14).
    """
    first, gram, orthogonality, trusted = _cholesky_pass(matrix)
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    if bool((trusted & (orthogonality <= ORTHONORMAL_AFTER_ONE_PASS)).all()):
        return first, trusted
    factor, info = torch.linalg.cholesky_ex(torch.where(trusted[:, None, None], gram, identity))
    basis = _right_inverse_transpose(first, factor)
    return basis, trusted & (info == 0)


def _householder_basis(
    matrix: torch.Tensor, rtol: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR, then the rank from the singular values of ``R`` (as reliable as a full SVD)."""
    q_factor, r_factor = torch.linalg.qr(matrix)
    # Only the left vectors and the singular values are used: no right vectors of all k columns.
    left, singular, _ = torch.linalg.svd(r_factor, full_matrices=False)
    n, k = matrix.shape[-2:]
    if rtol is None:
        rtol = max(n, k) * torch.finfo(torch.float64).eps
    keep = singular > rtol * singular[..., :1]
    return (q_factor @ left) * keep[..., None, :], keep.sum(-1)


def orthonormal_basis(
    matrix: torch.Tensor,
    key_mask: KeyMask,
    rtol: float | None = None,
) -> tuple[RowBases, torch.Tensor]:
    """Orthonormal basis of the column space of ``matrix`` restricted to the real keys.

    Columns are scaled to unit norm first, so the rank decision does not depend on the units of the
    value vectors. Well-conditioned matrices (the common case) take two passes of Cholesky QR;
    the others a Householder QR whose ``R`` factor's singular values decide the rank.

    Args:
        matrix: ``(G, n, k)`` columns spanning the space (e.g. ``[1, V]``).
        key_mask: ``(G, n)`` real keys; rows of padding keys are treated as zero.
        rtol: singular values below ``rtol * sigma_max`` are dropped. Default
            ``max(n, k) * eps(float64)``, as in :func:`numpy.linalg.matrix_rank`.

    Returns:
        ``(basis, rank)``: ``basis`` of shape ``(G, n, min(n, k))`` in float64 whose first
        ``rank[g]`` columns are orthonormal and the rest exactly zero, and ``rank`` of shape
        ``(G,)``. Rows of masked keys are exactly zero.
    """
    return _basis_of_unit_columns(unit_columns(matrix.to(torch.float64), key_mask), key_mask, rtol)


def unit_columns(matrix: torch.Tensor, key_mask: KeyMask, out: torch.Tensor | None = None):
    """``matrix`` with padding rows zeroed and columns scaled to unit norm (zero columns stay)."""
    if not bool(key_mask.all()):
        matrix = matrix * key_mask[..., None]
    # Squares summed down the columns: torch's norm over a strided dimension took five times as
    # long (72 x 128 x 32 values: 0.65 vs 0.12 ms) and does not rescale either; the projections
    # pass values already scaled to magnitude one (engine.layout), far from over- and underflow.
    norms = matrix.square().sum(-2, keepdim=True).sqrt()
    return torch.div(matrix, torch.where(norms > 0, norms, torch.ones_like(norms)), out=out)


def _basis_of_unit_columns(
    matrix: torch.Tensor, key_mask: KeyMask, rtol: float | None
) -> tuple[RowBases, torch.Tensor]:
    """:func:`orthonormal_basis` of float64 columns already masked and scaled to unit norm."""
    n, k = matrix.shape[-2:]
    rank = torch.zeros(matrix.shape[0], dtype=torch.long, device=matrix.device)
    if n >= k:
        fast, trusted = _cholesky_qr2(matrix)
        if bool(trusted.all()):
            # Cholesky QR multiplies rows by a matrix: zero (padding) rows stay exactly zero.
            return fast, rank.fill_(k)
        basis, rank = fast * trusted[:, None, None], torch.where(trusted, k, rank)
    else:
        # Fewer keys than columns (short inputs): the columns span every key when the keys' rows
        # are independent, which Cholesky QR of the transpose certifies where they are well
        # conditioned (a padding key's zero row never is); any orthonormal basis of all n keys
        # then serves, and the identity is exact. The others take Householder QR (the SVD it
        # needs took 3.4 of the 6.5 ms that projecting 72 [CLS] rows of a 16-token input cost).
        trusted = _cholesky_pass(matrix.mT).trusted
        identity = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
        basis = identity * trusted[:, None, None]
        rank = torch.where(trusted, n, rank)
    hard = (~trusted).nonzero()[:, 0]
    householder, rank[hard] = _householder_basis(matrix[hard], rtol)
    # Householder QR leaves rounding noise in rows that were zero: padding must stay exactly 0.
    basis[hard] = householder * key_mask[hard][..., None]
    return basis, rank


def value_space_basis(
    values: torch.Tensor, key_mask: KeyMask, with_ones: bool, rtol: float | None = None
) -> tuple[RowBases, torch.Tensor]:
    """Basis of ``col(V)`` (effective attention) or ``col([1, V])`` (efficient attention).

    Args:
        values: ``(G, n, d)`` value vectors.
        key_mask: ``(G, n)`` real keys.
        with_ones: include the all-ones column, which encodes ``sum(x) = 1``.
        rtol: relative rank tolerance, see :func:`orthonormal_basis`.
    """
    if not with_ones:
        return orthonormal_basis(values, key_mask, rtol)
    # [1, V] with unit columns, written in place: the all-ones column's norm is known.
    groups, n, d = values.shape
    matrix = torch.empty(groups, n, d + 1, dtype=torch.float64, device=values.device)
    real = key_mask.to(torch.float64)
    matrix[..., 0] = real / real.sum(-1, keepdim=True).sqrt().clamp_min(1)
    unit_columns(values.to(torch.float64), key_mask, out=matrix[..., 1:])
    return _basis_of_unit_columns(matrix, key_mask, rtol)
