"""Orthonormal bases of value spaces, with rank decided by a relative tolerance in float64."""

from __future__ import annotations

import torch

from captum_effattn._typing import KeyMask, RowBases

# CholeskyQR2 is trusted when its first pass is orthonormal to this accuracy, i.e. when the
# columns' condition number is below ~1e6: far inside the rank tolerance, so such a matrix has full
# column rank under any tolerance we use. Everything else goes through Householder QR + SVD.
CHOLESKY_ORTHOGONALITY = 1e-4
# Rows whose condition number is certified below this span every key they have (short inputs):
# the same margin as :data:`CHOLESKY_ORTHOGONALITY` gives, far inside the rank tolerance.
CERTIFIED_CONDITION = 1e6
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


def _cholesky_qr2(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two passes of Cholesky QR; returns ``(basis, trusted)`` with ``trusted`` per group.

    The second pass is skipped when the first already gives orthonormal columns to
    :data:`ORTHONORMAL_AFTER_ONE_PASS` in every group (well-conditioned columns: MiniLM's value
    heads have condition numbers of 4-23, and the first pass leaves errors of 1e-15 to 4e-14).
    """
    gram = matrix.mT @ matrix
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    factor = torch.where((info == 0)[:, None, None], factor, identity)
    first = _right_inverse_transpose(matrix, factor)
    gram = first.mT @ first
    orthogonality = (gram - identity).abs().amax((-2, -1))
    trusted = (info == 0) & (orthogonality <= CHOLESKY_ORTHOGONALITY)
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


def spd_inverse(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inverse, factored)`` of a batch of symmetric matrices ``(G, m, m)``: each one's inverse
    through its Cholesky factor, and whether it factored (positive definite); where it did not,
    the inverse is the identity's and ``factored`` is False."""
    factor, info = torch.linalg.cholesky_ex(gram)
    factored = info == 0
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.cholesky_inverse(torch.where(factored[:, None, None], factor, identity)), factored


def _real_keys_first(key_mask: KeyMask) -> torch.Tensor:
    """``(G, n)`` key positions of each group, its real keys first, in their order."""
    return torch.argsort((~key_mask).to(torch.uint8), dim=-1, stable=True)


def _keys_independent(
    matrix: torch.Tensor, order: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """``(G,)`` bool: whether each group's ``count`` real keys have comfortably independent rows
    in ``matrix`` ``(G, n, k)``, ``count < k`` (then the columns span every real key).

    The rows are gathered real keys first (at most ``k - 1`` of them, whatever ``n``), a unit row
    standing in for each missing one, and their Gram matrix ``K`` factored:
    ``trace(K) trace(K^{-1})`` bounds ``K``'s condition number from above, so a bound within
    :data:`CERTIFIED_CONDITION` squared certifies the rows' condition number within it (far
    inside any rank tolerance). Cheaper than a pass of Cholesky QR over them, which builds an
    orthonormal basis this does not need (MiniLM's [CLS] rows of 8 tweets padded to 87 keys,
    under cProfile: 4.8 against 19 ms a projection).
    """
    most = int(count.max())
    if most == 0:
        return torch.ones_like(count, dtype=torch.bool)  # no keys: nothing to span
    k = matrix.shape[-1]
    live = torch.arange(most, device=matrix.device) < count[:, None]  # (G, most)
    rows = torch.gather(matrix, 1, order[:, :most, None].expand(-1, -1, k)) * live[..., None]
    gram = rows @ rows.mT + torch.diag_embed((~live).to(matrix.dtype))
    inverse, factored = spd_inverse(gram)
    bound = gram.diagonal(dim1=-2, dim2=-1).sum(-1) * inverse.diagonal(dim1=-2, dim2=-1).sum(-1)
    return factored & (bound <= CERTIFIED_CONDITION**2)


def _identity_on_real_keys(
    order: torch.Tensor, count: torch.Tensor, n: int, width: int
) -> RowBases:
    """``(G, n, width)`` bases of every real key: column ``j < count`` is the ``j``-th real key's
    unit vector, the others zero."""
    groups = order.shape[0]
    columns = torch.arange(width, device=order.device).expand(groups, width)
    basis = torch.zeros(groups, n, width, dtype=torch.float64, device=order.device)
    group = torch.arange(groups, device=order.device)[:, None].expand(groups, width)
    basis[group, order[:, :width], columns] = (columns < count[:, None]).to(basis.dtype)
    return basis


def _basis_of_unit_columns(
    matrix: torch.Tensor, key_mask: KeyMask, rtol: float | None
) -> tuple[RowBases, torch.Tensor]:
    """:func:`orthonormal_basis` of float64 columns already masked and scaled to unit norm.

    Groups with at least as many real keys as columns take two passes of Cholesky QR. Groups
    with fewer (short inputs, alone or padded in a batch) span every real key when those keys'
    rows are independent, which a bound on their condition number certifies where they are well
    conditioned (:func:`_keys_independent`): their basis is then the unit vectors of their real
    keys, exact. The rest take Householder QR and an SVD (MiniLM, the 72 [CLS] rows of a
    16-token input: its SVD took 3.4 of the 6.5 ms their projection cost; a batch of 8 tweets
    padded to 87 keys: 23 of 64 ms).
    """
    n, k = matrix.shape[-2:]
    count = key_mask.sum(-1)
    short = count < k
    # A trusted group's rank; the careful path below overwrites the others' basis and rank.
    rank = torch.where(short, count, k)
    if not bool(short.any()):
        basis, trusted = _cholesky_qr2(matrix)
        if bool(trusted.all()):
            # Cholesky QR multiplies rows by a matrix: zero (padding) rows stay exactly zero.
            return basis, rank
    else:
        basis = matrix.new_zeros(*matrix.shape[:-1], min(n, k))
        trusted = torch.zeros_like(short)
        long = (~short).nonzero()[:, 0]
        if len(long):
            basis[long], trusted[long] = _cholesky_qr2(matrix[long])
        few = short.nonzero()[:, 0]
        order = _real_keys_first(key_mask[few])
        trusted[few] = _keys_independent(matrix[few], order, count[few])
        basis[few] = _identity_on_real_keys(order, count[few], n, basis.shape[-1])
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
