"""Efficient attention: the minimum-norm attention distribution with the same head output.

For an attention row ``a`` over ``n`` keys and value vectors ``V`` (``n x d``), the valid rows that
give the head the same output are

    P(a) = { x : x >= 0, sum(x) = 1, x V = a V }      (never empty: a is in it)

and efficient attention is ``argmin_{x in P(a)} ||x||_2``: a probability distribution, sufficient
for the output, unique, and equal to ``a`` whenever ``[V, 1]`` spans all keys. This is this
project's precise construction of what Naim & Asher (ECAI 2024, arXiv 2410.18541) call efficient
attention, answering Brunner et al. (ICLR 2020); see the method page of the documentation
(docs/method.md).

The QP is solved in its dual (``theta`` in ``R^r``, ``r = rank([V, 1]) <= d + 1``): semismooth
Newton with an exact line search first, then an interior-point method with an exact crossover for
the rows Newton does not finish. Everything runs in float64 whatever the input dtype.
"""

from __future__ import annotations

import torch

from captum_effattn._typing import AttentionRows, KeyMask, ValueVectors
from captum_effattn.projection.basis import value_space_basis
from captum_effattn.projection.certificate import ProjectionCertificate
from captum_effattn.projection.engine.backends import Backend
from captum_effattn.projection.engine.driver import ChunkResult, LayoutResult, project_rows
from captum_effattn.projection.engine.grouped import GroupedProducts
from captum_effattn.projection.engine.layout import Chunk, RowLayout
from captum_effattn.projection.engine.validation import (
    DISTRIBUTION_TOL,
    check_distributions,
    check_solver_options,
)
from captum_effattn.projection.solvers.interior import interior_point_phase

SOLVERS = ("auto", "newton", "interior")
NEWTON_TOL = 1e-13
INTERIOR_TOL = 1e-12
SIMPLEX_TOL = 1e-12


def _compiled_route(backend: Backend, solver: str, rank_rtol: float | None) -> bool:
    """Whether rows go to the compiled Newton on ``[1, V]`` first: a backend that has it, a
    solver that starts with Newton, and no caller's own rank tolerance (that is for the bases'
    rank decisions: keep that route then)."""
    return backend.value_newton is not None and solver != "interior" and rank_rtol is None


def _newton_steps(backend: Backend, max_newton_iter: int | None) -> int:
    """The caller's step limit, or the backend's default."""
    return backend.newton_steps if max_newton_iter is None else max_newton_iter


def _solve_layout(
    layout: RowLayout, backend: Backend, out: torch.Tensor, max_newton_iter: int | None
) -> LayoutResult:
    """Every row by compiled Newton in the coordinates of ``[1, V]``: no bases, no chunks, the
    values read as given; a row it solves is trusted only as far as it is measured
    (:meth:`~captum_effattn.projection.engine.driver.LayoutResult.measured`), the others go
    through the chunks to the route with bases."""
    assert backend.value_newton is not None  # checked by _compiled_route
    _, iterations, solved, error = backend.value_newton(
        layout.source_values,
        layout.source_mask,
        layout.group_source[layout.row_group],
        layout.rows,
        _newton_steps(backend, max_newton_iter),
        NEWTON_TOL,
        layout.group_prefix[layout.row_group],
        out=out,
    )
    return LayoutResult.measured(error, iterations, solved)


def _solve_with_bases(
    chunk: Chunk,
    row_mask: torch.Tensor,
    backend: Backend,
    solver: str,
    newton_steps: int,
    max_interior_iter: int,
    rank_rtol: float | None,
) -> ChunkResult:
    """Orthonormal bases of ``[1, V]``, then Newton and the interior point on their coordinates."""
    basis, rank = value_space_basis(chunk.values, chunk.key_mask, with_ones=True, rtol=rank_rtol)
    n_real = row_mask.sum(-1)
    raw = chunk.rows * row_mask
    a = raw / raw.sum(-1, keepdim=True)
    # [V, 1] spans every real key: P(a) = {a}, the row is identifiable as it stands.
    unchanged = rank[chunk.group] == n_real
    x = torch.where(unchanged[:, None], raw, a)
    n = x.shape[-1]
    iterations = torch.zeros(len(a), dtype=torch.long, device=a.device)
    failed = torch.zeros(len(a), dtype=torch.bool, device=a.device)
    todo = (~unchanged).nonzero()[:, 0]
    if len(todo):
        ops = backend.grouped(basis, chunk.group[todo])
        c = ops.right(a[todo])
        solved = torch.zeros(len(todo), dtype=torch.bool, device=a.device)
        found = torch.full((len(todo), n), torch.nan, dtype=a.dtype, device=a.device)
        if solver != "interior":
            theta, newton_its, solved = backend.newton(ops, c, c.clone(), newton_steps, NEWTON_TOL)
            found = ops.left(theta).clamp_min(0)
            iterations[todo] = newton_its
        hard = (~solved).nonzero()[:, 0]
        if solver != "newton" and len(hard):
            dead = (basis.abs().sum(-2) == 0)[chunk.group[todo[hard]]]
            x_hard, interior_its, _ = interior_point_phase(
                ops.subset(hard),
                c[hard],
                row_mask[todo[hard]],
                dead,
                max_interior_iter,
                INTERIOR_TOL,
            )
            # Newton's last iterate may still be the better one (the interior point can stop at
            # its rounding floor): keep whichever meets the constraints better.
            found[hard] = _closer(ops.subset(hard), c[hard], found[hard], x_hard)
            iterations[todo[hard]] += interior_its
        x[todo], failed[todo] = _distributions_or_input(ops, c, found, a[todo])
    return ChunkResult(
        rows=x,
        reference=torch.where(unchanged[:, None], raw, a),
        iterations=iterations,
        unchanged=unchanged,
        failed=failed,
    )


def _constraint_residual(ops: GroupedProducts, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``||B^T x - c||`` of each row normalized to sum one; ``inf`` where that is impossible."""
    total = x.sum(-1, keepdim=True)
    usable = torch.isfinite(x).all(-1) & (total[:, 0] > 0)
    scaled = torch.where(usable[:, None], x / torch.where(usable[:, None], total, 1), 0)
    residual = (ops.right(scaled) - c).norm(dim=-1)
    return torch.where(usable, residual, torch.inf)


def _closer(
    ops: GroupedProducts, c: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """Per row, whichever candidate meets ``B^T x = c`` (after normalization) better."""
    second_better = _constraint_residual(ops, c, second) < _constraint_residual(ops, c, first)
    return torch.where(second_better[:, None], second, first)


def _distributions_or_input(
    ops: GroupedProducts, c: torch.Tensor, x: torch.Tensor, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` normalized to sum one, and the input row ``a`` itself (valid, not minimal) where
    no solver left a usable row; the second tensor flags those rows as failed."""
    failed = ~torch.isfinite(_constraint_residual(ops, c, x))
    total = x.sum(-1, keepdim=True)
    rows = torch.where(failed[:, None], a, x / torch.where(failed[:, None], 1, total))
    return rows, failed


def efficient_attention(
    attn: AttentionRows,
    values: ValueVectors,
    key_mask: KeyMask | None = None,
    causal: bool = False,
    *,
    tol: float = 1e-9,
    return_certificate: bool = False,
    solver: str = "auto",
    max_newton_iter: int | None = None,
    max_interior_iter: int = 200,
    rank_rtol: float | None = None,
    distribution_tol: float | None = None,
    backend: str = "auto",
) -> AttentionRows | tuple[AttentionRows, ProjectionCertificate]:
    """Efficient attention: the minimum-norm valid attention rows with the same head output.

    Each row ``a`` of ``attn`` is replaced by ``argmin ||x||`` over ``{x >= 0, sum(x) = 1,
    x V = a V}``. The result is a probability distribution over the real keys, reproduces the head
    output ``a V`` (so substituting it leaves the model's output unchanged), is unique, and equals
    ``a`` when ``[V, 1]`` spans all real keys (generically when ``n <= d + 1``).

    Args:
        attn: ``(*batch, q, n)`` post-softmax attention rows; each must be a probability
            distribution over the row's real keys (within ``distribution_tol``; it is renormalized
            in float64). ``q == n`` for full matrices.
        values: ``(*batch, n, d)`` the head's value vectors, bias included. Its leading
            dimensions broadcast to ``attn``'s (never the other way): pass ``(B, H_kv, 1, n, d)``
            against attention
            ``(B, H_kv, group, q, n)`` for grouped-query attention (the shared value head is then
            factored once). To account for a rank-deficient output projection, pass ``V W_O^h``.
        key_mask: ``(*batch, n)`` booleans (or 0/1), ``True`` for real keys. Padding keys are
            excluded from the value space and get exactly 0 weight. Default: all keys real.
        causal: row ``i`` may use keys ``<= i`` only, and is projected within its own prefix's
            value space (requires ``q == n``).
        tol: relative head-output error a row must reach to count as converged.
        return_certificate: also return a :class:`ProjectionCertificate` with each row's output
            error, simplex violation, iterations and convergence flag.
        solver: ``"auto"`` (semismooth Newton, then interior point for rows Newton does not
            finish), ``"newton"`` or ``"interior"`` alone (for benchmarks and tests).
        max_newton_iter: Newton steps per row at most before handing the row over to the
            interior point. Default: 1000 with the compiled (numba) Newton phase, 50 otherwise.
        max_interior_iter: interior-point iterations per row at most.
        rank_rtol: relative tolerance for the rank of ``[V, 1]`` (default ``max(n, d + 1) * eps``
            in float64, after scaling columns to unit norm).
        distribution_tol: how far an input row may be from a distribution (negative entries, mass
            on masked keys, sum minus one). Default by dtype: 1e-6 (float64), 1e-4 (float32),
            5e-3 (float16), 3e-2 (bfloat16).
        backend: ``"auto"`` (for CPU tensors the Newton phase compiled with numba when numba is
            installed, PyTorch otherwise and on CUDA, where it was faster than the Triton
            kernels), ``"torch"``, ``"numba"``, ``"triton"`` (Triton kernels for the solver's
            matrix products on CUDA tensors) or ``"cudagraph"`` (the Newton phase replayed from
            CUDA graphs, CUDA tensors); a named backend raises
            :class:`~captum_effattn.kernels.KernelUnavailableError` where it cannot run. All
            compute in float64 and agree to rounding.

    Returns:
        Rows shaped like ``attn``, in its dtype, detached; with ``return_certificate=True`` a
        tuple ``(rows, certificate)``.

    Raises:
        TypeError, ValueError: malformed inputs (see :func:`effective_attention`), or a row that
            is not a probability distribution over its real keys.
        KernelUnavailableError: ``backend="numba"``, ``"triton"`` or ``"cudagraph"`` where it
            cannot run.

    Warns:
        ConvergenceWarning: a row missed ``tol``; the certificate says which.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    check_solver_options(tol, rank_rtol, distribution_tol, max_newton_iter, max_interior_iter)

    def validate(layout, row_masks):
        limit = distribution_tol if distribution_tol is not None else DISTRIBUTION_TOL[attn.dtype]
        check_distributions(layout.rows, row_masks, limit, attn.shape, layout.row_index)

    rows, certificate = project_rows(
        "efficient_attention",
        attn,
        values,
        key_mask,
        causal,
        rank_width=values.shape[-1] + 1 if isinstance(values, torch.Tensor) else 1,
        solve_chunk=lambda chunk, row_mask, chosen: _solve_with_bases(
            chunk,
            row_mask,
            chosen,
            solver,
            _newton_steps(chosen, max_newton_iter),
            max_interior_iter,
            rank_rtol,
        ),
        tol=tol,
        simplex_tol=SIMPLEX_TOL,
        validate_rows=validate,
        backend=backend,
        solve_layout=lambda layout, chosen, out: (
            _solve_layout(layout, chosen, out, max_newton_iter)
            if _compiled_route(chosen, solver, rank_rtol)
            else None
        ),
    )
    return (rows, certificate) if return_certificate else rows
