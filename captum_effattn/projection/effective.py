"""Effective attention (Brunner et al., ICLR 2020): the part of a row the head output can see.

``a_eff = a U U^T`` with ``U`` an orthonormal basis of ``col(V)``: the orthogonal projection of the
row onto the value space. It gives exactly the same head output and has the least Euclidean norm of
all rows that do, but it is not a probability distribution (entries go negative, rows need not sum
to one).
"""

from __future__ import annotations

import torch

from captum_effattn._typing import AttentionRows, KeyMask, ValueVectors
from captum_effattn.projection.basis import (
    MAX_INVERSE_NORM,
    spd_inverse,
    unit_columns,
    value_space_basis,
)
from captum_effattn.projection.certificate import ProjectionCertificate
from captum_effattn.projection.engine.backends import Backend
from captum_effattn.projection.engine.certify import ACCEPTED_ERROR
from captum_effattn.projection.engine.driver import (
    ChunkResult,
    LayoutResult,
    chunk_error,
    project_rows,
    with_fallback,
)
from captum_effattn.projection.engine.layout import Chunk, RowLayout
from captum_effattn.projection.engine.validation import (
    DISTRIBUTION_TOL,
    check_masked_mass,
    check_solver_options,
)


def _project_chunk(
    chunk: Chunk, row_mask: torch.Tensor, backend: Backend, rank_rtol: float | None
) -> ChunkResult:
    a = chunk.rows * row_mask
    # A caller's own rank tolerance is for the bases' rank decisions, and fused kernels project
    # onto a basis: build one then.
    if rank_rtol is not None or backend.fused_projection:
        return _onto_basis(chunk, a, backend, rank_rtol)
    if not bool(_more_keys_than_columns(chunk).any()):
        # No group has more keys than columns (short inputs): the normal equations would keep
        # no row, so go straight to the basis (MiniLM's 72 [CLS] rows of a 16-token input:
        # 2.5 against 6.2-7.0 ms).
        return _onto_basis(chunk, a, backend, None)
    result, kept = _by_normal_equations(chunk, a, backend)
    return with_fallback(
        result, chunk, kept, backend, lambda left, rest: _onto_basis(left, a[rest], backend, None)
    )


def _compiled_route(backend: Backend, rank_rtol: float | None) -> bool:
    """Whether rows go to the compiled projection on ``V`` first: a backend that has it, and no
    caller's own rank tolerance (that is for the bases' rank decisions: keep that route then)."""
    return backend.value_projection is not None and rank_rtol is None


def _solve_layout(layout: RowLayout, backend: Backend, out: torch.Tensor) -> LayoutResult:
    """Every row projected by the compiled kernel on ``V`` itself: no bases, no chunks, the values
    read as given (MiniLM's 72 [CLS] rows at n = 128, two threads: 1.98 against 9.56 ms through
    the normal equations in PyTorch; 576 at batch 8: 11.2 against 61.6 ms). The rows it keeps
    meet the head output within :data:`~captum_effattn.projection.engine.certify.ACCEPTED_ERROR`,
    as the normal equations' do; the others go through the chunks."""
    assert backend.value_projection is not None  # checked by _compiled_route
    _, iterations, solved, error = backend.value_projection(
        layout.source_values,
        layout.source_mask,
        layout.group_source[layout.row_group],
        layout.rows,
        layout.group_prefix[layout.row_group],
        out=out,
    )
    return LayoutResult.measured(error, iterations, solved)


def _onto_basis(
    chunk: Chunk, a: torch.Tensor, backend: Backend, rank_rtol: float | None
) -> ChunkResult:
    """``a U U^T`` with ``U`` an orthonormal basis of each group's values (any rank)."""
    basis, _ = value_space_basis(chunk.values, chunk.key_mask, with_ones=False, rtol=rank_rtol)
    return _result(backend.grouped(basis, chunk.group).project(a), a)


def _more_keys_than_columns(chunk: Chunk) -> torch.Tensor:
    """``(G,)`` bool: the groups with more real keys than value columns, the only ones the
    normal equations can keep."""
    return chunk.key_mask.sum(-1) > chunk.values.shape[-1]


def _by_normal_equations(
    chunk: Chunk, a: torch.Tensor, backend: Backend
) -> tuple[ChunkResult, torch.Tensor]:
    """``a W G^{-1} W^T`` with ``W`` the unit columns of each group's values and ``G = W^T W``,
    and which rows to keep: those of groups whose ``W`` is well conditioned (``||L^{-1}||_F <=``
    :data:`~captum_effattn.projection.basis.MAX_INVERSE_NORM`, ``G = L L^T``) and have more
    real keys than columns, that meet the head output within
    :data:`~captum_effattn.projection.engine.certify.ACCEPTED_ERROR`. With no more keys than
    columns the projection is the identity or ``V`` is rank-deficient on them: the basis route
    returns those rows as they are, where ``W G^{-1} W^T`` would round them (short causal
    prefixes).

    The same projection as :func:`_onto_basis` for full-rank values, without the orthonormal
    basis (MiniLM, the 72 [CLS] rows of one 128-token review, ``effective_attention`` on one
    thread: 7.0 ms against 10.9 ms through the basis).
    """
    columns = unit_columns(chunk.values, chunk.key_mask)
    inverse, factored = spd_inverse(columns.mT @ columns)
    more_keys = _more_keys_than_columns(chunk)
    # ||L^{-1}||_F^2 = trace(G^{-1}).
    conditioned = (
        factored & more_keys & (inverse.diagonal(dim1=-2, dim2=-1).sum(-1) <= MAX_INVERSE_NORM**2)
    )
    inverse = torch.where(conditioned[:, None, None], inverse, 0)
    ops = backend.grouped(columns, chunk.group)
    x = ops.left(backend.grouped(inverse, chunk.group).right(ops.right(a)))
    error = chunk_error(backend, chunk, x, a)
    return _result(x, a, error), conditioned[chunk.group] & (error <= ACCEPTED_ERROR)


def _result(x: torch.Tensor, a: torch.Tensor, error: torch.Tensor | None = None) -> ChunkResult:
    return ChunkResult(
        rows=x,
        reference=a,
        iterations=torch.zeros(len(a), dtype=torch.long, device=a.device),
        unchanged=torch.zeros(len(a), dtype=torch.bool, device=a.device),
        error=error,
    )


def effective_attention(
    attn: AttentionRows,
    values: ValueVectors,
    key_mask: KeyMask | None = None,
    causal: bool = False,
    *,
    tol: float = 1e-9,
    return_certificate: bool = False,
    rank_rtol: float | None = None,
    backend: str = "auto",
) -> AttentionRows | tuple[AttentionRows, ProjectionCertificate]:
    """Effective attention: each row projected orthogonally onto the head's value space.

    Args:
        attn: ``(*batch, q, n)`` attention rows (any real rows; ``q == n`` for full matrices).
        values: ``(*batch, n, d)`` the head's value vectors, bias included; its leading
            dimensions broadcast to ``attn``'s (grouped-query attention: see
            :func:`efficient_attention`).
        key_mask: ``(*batch, n)`` booleans (or 0/1), ``True`` for real keys. Padding keys are
            excluded from the value space and get exactly 0. Default: all keys real.
        causal: row ``i`` is projected onto the span of ``V[:i+1]`` (its own prefix), never onto
            future keys; requires ``q == n``.
        tol: relative head-output error for the certificate's ``converged`` flag.
        return_certificate: also return a :class:`ProjectionCertificate` (its
            ``simplex_violation`` shows how far each row is from a distribution).
        rank_rtol: relative rank tolerance for ``V`` (default ``max(n, d) * eps`` in float64 after
            scaling columns to unit norm).
        backend: ``"auto"`` (``"numba"`` for CPU tensors where it is installed, PyTorch
            elsewhere, see :data:`~captum_effattn.projection.engine.backends.AUTO_ORDER`),
            ``"numba"`` (rows projected one by one by a compiled kernel, on the caller's
            threads), ``"torch"``, or ``"triton"`` (Triton kernels for CUDA tensors; raises
            :class:`~captum_effattn.kernels.KernelUnavailableError` where the kernels cannot run).
            All compute in float64 and agree to rounding.

    Returns:
        Rows of shape ``(*batch, q, n)`` in ``attn``'s dtype, detached; with
        ``return_certificate=True`` a tuple ``(rows, certificate)``.

    Raises:
        TypeError: a non-tensor or non-floating-point input.
        ValueError: shapes that do not fit (``values`` must be ``(*batch, n, d)``, ``key_mask``
            ``(*batch, n)``), leading dimensions that do not broadcast, NaN or inf, ``causal``
            with ``q != n``, an example whose keys are all masked, or an unknown ``backend``.
        KernelUnavailableError: ``backend="triton"`` where the kernels cannot run.
    """
    check_solver_options(tol, rank_rtol)

    def validate(layout, row_masks):
        limit = DISTRIBUTION_TOL[attn.dtype]
        check_masked_mass(layout.rows, row_masks, limit, attn.shape, layout.row_index)

    rows, certificate = project_rows(
        "effective_attention",
        attn,
        values,
        key_mask,
        causal,
        rank_width=values.shape[-1] if isinstance(values, torch.Tensor) else 1,
        solve_chunk=lambda chunk, row_mask, chosen: _project_chunk(
            chunk, row_mask, chosen, rank_rtol
        ),
        tol=tol,
        simplex_tol=None,
        validate_rows=validate,
        backend=backend,
        solve_layout=lambda layout, chosen, out: (
            _solve_layout(layout, chosen, out) if _compiled_route(chosen, rank_rtol) else None
        ),
    )
    return (rows, certificate) if return_certificate else rows
