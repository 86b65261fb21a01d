"""The semismooth Newton phase of :mod:`._newton`, compiled row by row with numba (CPU).

Same iteration, same constants: Newton steps on the dual ``max theta^T c - 1/2 ||relu(B theta)||^2``
with the Levenberg-Marquardt-regularized support Gram matrix and the exact line search. Batched
PyTorch runs every step as some forty small tensor operations over all unfinished rows, and on a
CPU those are latency-bound (about 1 ms per step for 72 rows of 64 keys whatever their
arithmetic). Compiled, a row costs its arithmetic only, and two things batching cannot do become
cheap: the support's Gram matrix is updated from just the keys that entered or left it, and each
row stops the moment it converges. The kernel releases the GIL, so rows are shared among as many
Python threads as the caller allows PyTorch (:func:`._threads.allowed_threads`), in small blocks
handed out as threads become free: a few rows need ten times the median number of steps.

Needs ``numba`` (``pip install captum-effattn[numba]``); :func:`numba_available` says whether it is
importable. The first call compiles (a few seconds, cached on disk afterwards).
"""

from __future__ import annotations

import importlib.util
import math
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch

from captum_effattn.projection._newton import REGULARIZATION, REGULARIZATION_FLOOR
from captum_effattn.projection._threads import allowed_threads

# Reassociation lets LLVM vectorize the dot products (sums in a different order, same accuracy).
FAST_MATH = {"reassoc", "contract"}
# Rows per block handed to a thread: small enough to balance a few slow rows, large enough that
# handing a block over (~20 us) stays small next to solving it.
BLOCK_ROWS = 4


@cache
def numba_available() -> bool:
    """Whether ``numba`` can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("numba") is not None


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="captum_effattn_newton")


@cache
def _kernels():
    """Compile (or load from numba's on-disk cache) the per-row solver."""
    from numba import njit

    @njit(cache=True, fastmath=FAST_MATH, nogil=True)
    def cholesky_solve(hessian, rhs, factor, out):  # pragma: no cover - compiled
        """Solve ``hessian @ out = rhs`` (SPD, lower Cholesky in ``factor``); False if not PD."""
        r = hessian.shape[0]
        for j in range(r):
            total = hessian[j, j]
            for k in range(j):
                total -= factor[j, k] * factor[j, k]
            if not total > 0.0:
                return False
            pivot = math.sqrt(total)
            factor[j, j] = pivot
            for i in range(j + 1, r):
                total = hessian[i, j]
                for k in range(j):
                    total -= factor[i, k] * factor[j, k]
                factor[i, j] = total / pivot
        for i in range(r):  # L y = rhs
            total = rhs[i]
            for k in range(i):
                total -= factor[i, k] * out[k]
            out[i] = total / factor[i, i]
        for i in range(r - 1, -1, -1):  # L^T out = y
            total = out[i]
            for k in range(i + 1, r):
                total -= factor[k, i] * out[k]
            out[i] = total / factor[i, i]
        return True

    @njit(cache=True, fastmath=FAST_MATH, nogil=True)
    def exact_step(u, w, slope0, breaks, order_buffer):  # pragma: no cover - compiled
        """``t >= 0`` maximizing ``t s - 1/2 ||relu(u + t w)||^2`` (see ``_newton.exact_step``)."""
        n = u.shape[0]
        alpha = 0.0
        beta = 0.0
        moving = 0
        for i in range(n):
            ui, wi = u[i], w[i]
            if ui > 0.0 or (ui == 0.0 and wi > 0.0):
                alpha += wi * ui
                beta += wi * wi
            if (wi > 0.0 and ui < 0.0) or (wi < 0.0 and ui > 0.0):
                breaks[moving] = -ui / wi
                order_buffer[moving] = i
                moving += 1
        order = np.argsort(breaks[:moving])
        for m in range(moving):
            t = breaks[order[m]]
            if slope0 - alpha - beta * t <= 0.0:
                break
            i = order_buffer[order[m]]
            sign = 1.0 if w[i] > 0.0 else -1.0
            alpha += sign * w[i] * u[i]
            beta += sign * w[i] * w[i]
        step = (slope0 - alpha) / max(beta, 2.2250738585072014e-308)
        return max(step, 0.0)

    @njit(cache=True, fastmath=FAST_MATH, nogil=True)
    def newton_rows(
        bases, group, c, theta, max_iter, tol, regularization, floor, iterations, converged
    ):  # pragma: no cover - compiled
        rows, r = c.shape
        n = bases.shape[1]
        u = np.empty(n)
        w = np.empty(n)
        breaks = np.empty(n)
        order_buffer = np.empty(n, dtype=np.int64)
        support = np.zeros(n, dtype=np.bool_)
        gram = np.zeros((r, r))
        hessian = np.empty((r, r))
        factor = np.zeros((r, r))
        gradient = np.empty(r)
        direction = np.empty(r)
        for row in range(rows):
            basis = bases[group[row]]
            th = theta[row]
            target = c[row]
            support[:] = False
            gram[:, :] = 0.0
            size = 0
            step_count = 0
            while True:
                for i in range(n):
                    total = 0.0
                    for k in range(r):
                        total += basis[i, k] * th[k]
                    u[i] = total
                gradient[:] = target
                for i in range(n):
                    if u[i] > 0.0:
                        for k in range(r):
                            gradient[k] -= basis[i, k] * u[i]
                norm = math.sqrt(np.sum(gradient * gradient))
                if norm <= tol:
                    converged[row] = True
                    break
                if step_count == max_iter:
                    break
                # The support's Gram matrix: from the keys that moved when they are few.
                changes = 0
                new_size = 0
                for i in range(n):
                    inside = u[i] > 0.0
                    new_size += inside
                    changes += inside != support[i]
                if 2 * changes < new_size:
                    for i in range(n):
                        inside = u[i] > 0.0
                        if inside != support[i]:
                            sign = 1.0 if inside else -1.0
                            for p in range(r):
                                scaled = sign * basis[i, p]
                                for q in range(r):
                                    gram[p, q] += scaled * basis[i, q]
                            support[i] = inside
                else:
                    gram[:, :] = 0.0
                    for i in range(n):
                        inside = u[i] > 0.0
                        support[i] = inside
                        if inside:
                            for p in range(r):
                                scaled = basis[i, p]
                                for q in range(r):
                                    gram[p, q] += scaled * basis[i, q]
                size = new_size
                mu = regularization * norm + floor
                while True:
                    hessian[:, :] = gram
                    for p in range(r):
                        hessian[p, p] += mu
                    if cholesky_solve(hessian, gradient, factor, direction):
                        break
                    mu *= 10.0  # rounding made the regularized matrix indefinite: damp more
                for i in range(n):
                    total = 0.0
                    for k in range(r):
                        total += basis[i, k] * direction[k]
                    w[i] = total
                slope0 = np.sum(direction * target)
                step = exact_step(u, w, slope0, breaks, order_buffer)
                for k in range(r):
                    th[k] += step * direction[k]
                step_count += 1
            iterations[row] = step_count
        return size

    return newton_rows


def compiled_newton_phase(
    ops,
    c: torch.Tensor,
    theta: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`._newton.newton_phase` for CPU tensors, compiled.

    Args:
        ops: the rows' bases (:class:`._grouped.GroupedMatrices`: ``matrices`` ``(G, n, r)``
            orthonormal, zero rows on masked keys; ``group`` ``(R,)``).
        c: ``(R, r)`` the rows' coordinates ``B^T a``.
        theta: ``(R, r)`` starting dual points (not modified).
        max_iter, tol: as in :func:`._newton.newton_phase`.

    Returns:
        ``(theta, iterations, converged)``, each per row.
    """
    newton_rows = _kernels()
    bases, group = ops.matrices, ops.group
    bases_np = np.ascontiguousarray(bases.detach().cpu().numpy(), dtype=np.float64)
    c_np = np.ascontiguousarray(c.detach().cpu().numpy(), dtype=np.float64)
    theta_np = np.array(theta.detach().cpu().numpy(), dtype=np.float64, order="C", copy=True)
    group_np = np.ascontiguousarray(group.detach().cpu().numpy(), dtype=np.int64)
    iterations = np.zeros(len(c_np), dtype=np.int64)
    converged = np.zeros(len(c_np), dtype=np.bool_)

    def solve(rows: slice) -> None:
        newton_rows(
            bases_np,
            group_np[rows],
            c_np[rows],
            theta_np[rows],
            max_iter,
            tol,
            REGULARIZATION,
            REGULARIZATION_FLOOR,
            iterations[rows],
            converged[rows],
        )

    workers = min(allowed_threads(), -(-len(c_np) // BLOCK_ROWS))
    if workers <= 1:
        solve(slice(None))
    else:
        blocks = [slice(i, i + BLOCK_ROWS) for i in range(0, len(c_np), BLOCK_ROWS)]
        for _ in _pool(workers).map(solve, blocks):
            pass  # re-raises a block's exception here
    return (
        torch.from_numpy(theta_np),
        torch.from_numpy(iterations),
        torch.from_numpy(converged),
    )
