"""Orthonormal bases of value spaces, with rank decided by a relative tolerance in float64."""

from __future__ import annotations

import torch

from captum_effattn._typing import KeyMask, RowBases


def orthonormal_basis(
    matrix: torch.Tensor,
    key_mask: KeyMask,
    rtol: float | None = None,
) -> tuple[RowBases, torch.Tensor]:
    """Orthonormal basis of the column space of ``matrix`` restricted to the real keys.

    Columns are scaled to unit norm first, so the rank decision does not depend on the units of the
    value vectors; the rank is then read off the singular values of the thin-QR factor ``R`` (as
    cheap as QR, as reliable as an SVD of the whole matrix).

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
    matrix = matrix.to(torch.float64) * key_mask[..., None]
    norms = matrix.norm(dim=-2, keepdim=True)
    matrix = matrix / torch.where(norms > 0, norms, torch.ones_like(norms))
    q_factor, r_factor = torch.linalg.qr(matrix)
    left, singular, _ = torch.linalg.svd(r_factor)
    n, k = matrix.shape[-2:]
    if rtol is None:
        rtol = max(n, k) * torch.finfo(torch.float64).eps
    keep = singular > rtol * singular[..., :1]
    # Householder factors leave rounding noise in rows that were zero: padding must stay exactly 0.
    basis = (q_factor @ left) * keep[..., None, :] * key_mask[..., None]
    return basis, keep.sum(-1)


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
    if with_ones:
        values = torch.cat([torch.ones_like(values[..., :1]), values], dim=-1)
    return orthonormal_basis(values, key_mask, rtol)
