"""Shared driver: validate, flatten, solve chunk by chunk, scatter back, certify."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from captum_effattn._typing import AttentionRows, KeyMask, ValueVectors
from captum_effattn.projection.certificate import ProjectionCertificate
from captum_effattn.projection.engine.backends import Backend, resolve_backend
from captum_effattn.projection.engine.certify import (
    ACCEPTED_ERROR,
    output_error,
    simplex_violation,
)
from captum_effattn.projection.engine.layout import Chunk, RowLayout, build_layout
from captum_effattn.projection.engine.threads import threads_for
from captum_effattn.projection.engine.validation import check_inputs


class ConvergenceWarning(UserWarning):
    """Some projected rows did not meet the requested tolerance (see the certificate)."""


@dataclass(frozen=True)
class ChunkResult:
    rows: torch.Tensor  # (R_c, n_c) float64 projected rows
    reference: torch.Tensor  # (R_c, n_c) the rows they are measured against
    iterations: torch.Tensor  # (R_c,)
    unchanged: torch.Tensor  # (R_c,) rows returned exactly as given (nothing to project)
    # (R_c,) rows no solver finished, returned as given (valid, not projected): never converged
    failed: torch.Tensor | None = None
    # (R_c,) the rows' output error, where the solver already measured it (chunk_error)
    error: torch.Tensor | None = None


ChunkSolver = Callable[[Chunk, torch.Tensor, Backend], ChunkResult]
"""Solves one chunk, given the chunk, its rows' key masks ``(R_c, n_c)`` and the backend."""


@dataclass(frozen=True)
class LayoutResult:
    """What a route over the whole layout solved, before any chunk is built (its rows are written
    into the driver's output)."""

    error: torch.Tensor  # (R,) the solved rows' output error
    iterations: torch.Tensor  # (R,) steps taken, solved or not (they add to the chunks' steps)
    solved: torch.Tensor  # (R,) the rows it solved; the others go through the chunks

    @classmethod
    def measured(
        cls, error: torch.Tensor, iterations: torch.Tensor, solved: torch.Tensor
    ) -> LayoutResult:
        """A compiled route's rows, trusted only as far as they are measured: those it solved
        whose output error is within
        :data:`~captum_effattn.projection.engine.certify.ACCEPTED_ERROR` (a route can report a row
        solved far from the constraints, seen on MiniLM layer 0 at n = 34)."""
        return cls(error=error, iterations=iterations, solved=solved & (error <= ACCEPTED_ERROR))


LayoutSolver = Callable[[RowLayout, Backend, torch.Tensor], LayoutResult | None]
"""Solves what it can of a whole layout (or returns ``None`` where it does not apply), given the
layout, the backend and the output ``(R, n)`` float64 to write solved rows into (in place: every
row of a large problem, ``query="all"``, has no second copy): rows solved from the inputs as they
are need no chunk, and so no float64 copy of their values."""


def chunk_error(
    backend: Backend, chunk: Chunk, rows: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    """``output_error`` of a chunk's projected ``rows`` against ``reference``, with its values."""
    return output_error(backend.grouped(chunk.values, chunk.group), rows, reference)


def with_fallback(
    result: ChunkResult,
    chunk: Chunk,
    kept: torch.Tensor,
    backend: Backend,
    route: Callable[[Chunk, torch.Tensor], ChunkResult],
) -> ChunkResult:
    """``result`` of a fast route, its rows not ``kept`` replaced (in place) by those of
    ``route(sub_chunk, rows)`` on the sub-chunk of those rows: iterations add up (steps taken on
    both routes), and their output errors are measured where ``result`` carries errors."""
    rest = (~kept).nonzero()[:, 0]
    if not len(rest):
        return result
    left = chunk.subset(rest)
    other = route(left, rest)
    result.rows[rest] = other.rows
    result.reference[rest] = other.reference
    result.unchanged[rest] = other.unchanged
    result.iterations[rest] += other.iterations
    if result.failed is not None:
        result.failed[rest] = other.failed if other.failed is not None else False
    if result.error is not None:
        error = other.error
        if error is None:
            error = chunk_error(backend, left, other.rows, other.reference)
        result.error[rest] = error
    return result


def _empty(attn: torch.Tensor, tol: float) -> tuple[torch.Tensor, ProjectionCertificate]:
    """No rows (an empty batch, or no query rows): an empty result and certificate."""
    row_shape = attn.shape[:-1]
    none = torch.zeros(row_shape, dtype=torch.float64, device=attn.device)
    certificate = ProjectionCertificate(
        output_error=none,
        simplex_violation=none.clone(),
        iterations=none.long(),
        converged=none.bool(),
        tol=tol,
    )
    return attn.detach().clone(), certificate


def project_rows(
    name: str,
    attn: AttentionRows,
    values: ValueVectors,
    key_mask: KeyMask | None,
    causal: bool,
    rank_width: int,
    solve_chunk: ChunkSolver,
    tol: float,
    simplex_tol: float | None,
    validate_rows: Callable[[RowLayout, torch.Tensor], None] | None = None,
    backend: str = "auto",
    solve_layout: LayoutSolver | None = None,
) -> tuple[torch.Tensor, ProjectionCertificate]:
    """Run ``solve_chunk`` over every chunk of the problem and assemble output and certificate.

    Args:
        name: the public function's name, for warnings.
        rank_width: basis width the solver builds (``d`` or ``d + 1``), to size chunks.
        tol: output-error tolerance for ``converged``.
        simplex_tol: if set, rows must also be distributions within this tolerance to count as
            converged.
        validate_rows: optional check of the flat rows and their key masks before solving.
        backend: a name registered in :mod:`.backends`, or ``"auto"``.
        solve_layout: optional first route over every row; the rows it leaves unsolved go
            through ``solve_chunk``, chunk by chunk.
    """
    inputs = check_inputs(attn, values, key_mask, causal)
    chosen = resolve_backend(backend, inputs.attn.device)
    if attn.numel() == 0:
        return _empty(attn, tol)
    layout = build_layout(inputs, causal)
    row_masks = layout.row_masks()
    if validate_rows is not None:
        validate_rows(layout, row_masks)
    R, n = layout.rows.shape
    out = torch.zeros(R, n, dtype=torch.float64, device=layout.rows.device)
    error = torch.zeros(R, dtype=torch.float64, device=out.device)
    iterations = torch.zeros(R, dtype=torch.long, device=out.device)
    unchanged = torch.zeros(R, dtype=torch.bool, device=out.device)
    failed = torch.zeros(R, dtype=torch.bool, device=out.device)
    whole = solve_layout(layout, chosen, out) if solve_layout is not None else None
    remaining, remaining_ids = layout, None
    if whole is not None:
        error[whole.solved] = whole.error[whole.solved]
        iterations += whole.iterations
        remaining_ids = (~whole.solved).nonzero()[:, 0]
        out[remaining_ids] = 0.0  # what the route wrote there is not kept
        remaining = layout.subset(remaining_ids)
    with torch.no_grad():
        for chunk in remaining.chunks(rank_width) if len(remaining.rows) else ():
            mask_c = chunk.key_mask[chunk.group]
            work = chunk.rows.numel() * rank_width
            if not chosen.batched_newton:
                # Newton runs compiled, outside PyTorch: the chunk's PyTorch work is its bases.
                work = max(work, chunk.key_mask.numel() * rank_width**2)
            with threads_for(work, chunk.rows.device):
                result = solve_chunk(chunk, mask_c, chosen)
                error_c = result.error
                if error_c is None:
                    error_c = chunk_error(chosen, chunk, result.rows, result.reference)
            n_c = result.rows.shape[-1]
            ids = chunk.row_ids if remaining_ids is None else remaining_ids[chunk.row_ids]
            out[ids, :n_c] = result.rows
            error[ids] = error_c
            iterations[ids] += result.iterations
            unchanged[ids] = result.unchanged
            if result.failed is not None:
                failed[ids] = result.failed
    violation = simplex_violation(out, row_masks)
    converged = error <= tol
    if simplex_tol is not None:
        converged &= violation <= simplex_tol
    converged = (converged | unchanged) & ~failed
    row_shape = (*layout.batch_shape, layout.q)
    certificate = ProjectionCertificate(
        output_error=error.reshape(row_shape),
        simplex_violation=violation.reshape(row_shape),
        iterations=iterations.reshape(row_shape),
        converged=converged.reshape(row_shape),
        tol=tol,
    )
    if not certificate.all_converged:
        first = layout.row_index(int((~converged).nonzero()[0]))
        warnings.warn(
            f"{name}: {int((~converged).sum())} of {R} rows did not reach the tolerance "
            f"(first at attn index {list(first)}); {certificate.summary()}. Pass "
            "return_certificate=True to inspect every row.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return out.to(attn.dtype).reshape(layout.out_shape), certificate
