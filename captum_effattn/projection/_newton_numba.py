"""The compiled kernels of :mod:`._compiled_newton` (imports numba: only where it is installed).

Plain loops over NumPy arrays, one row at a time; numba compiles them on first use and caches the
machine code on disk (``cache=True``), so later processes load them in milliseconds.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Reassociation lets LLVM vectorize the dot products (sums in a different order, same accuracy).
FAST_MATH = {"reassoc", "contract"}
# Bracket growths the line search tries (T = 4^k) before sweeping every breakpoint.
MAX_BRACKETS = 32
# ``u = B theta`` is carried along the steps (``u + t w``) and recomputed every this many steps,
# so rounding cannot pile up.
REFRESH_STEPS = 8


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
def line_slope(u, w, slope0, t):  # pragma: no cover - compiled
    """``phi'(t) = s - sum_i w_i relu(u_i + t w_i)``."""
    slope = slope0
    for i in range(u.shape[0]):
        moved = u[i] + t * w[i]
        if moved > 0.0:
            slope -= w[i] * moved
    return slope


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def exact_step(u, w, slope0, breaks, order_buffer):  # pragma: no cover - compiled
    """``t >= 0`` maximizing ``t s - 1/2 ||relu(u + t w)||^2`` (see ``_newton.exact_step``).

    ``phi'`` is non-increasing: a bracket ``[0, T]`` with ``phi'(T) <= 0`` (``T`` = 1, the full
    Newton step, then 4, 16, ...) holds the maximizer, so only the breakpoints below ``T`` are
    sorted and swept. Near convergence they are a handful of the row's keys. ``phi`` must be
    bounded above, as it is along every Newton direction (the dual is bounded: P(a) is not empty).
    """
    n = u.shape[0]
    bound = 1.0
    for _ in range(MAX_BRACKETS):
        if line_slope(u, w, slope0, bound) <= 0.0:
            break
        bound *= 4.0
    else:
        bound = np.inf
    alpha = 0.0
    beta = 0.0
    moving = 0
    for i in range(n):
        ui, wi = u[i], w[i]
        if ui > 0.0 or (ui == 0.0 and wi > 0.0):
            alpha += wi * ui
            beta += wi * wi
        if (wi > 0.0 and ui < 0.0) or (wi < 0.0 and ui > 0.0):
            t = -ui / wi
            if t < bound:
                breaks[moving] = t
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
    """Newton steps for each row until its dual gradient norm is at most ``tol``.

    Args:
        bases: ``(G, n, r)`` orthonormal bases.
        group: ``(R,)`` basis of each row.
        c: ``(R, r)`` the rows' coordinates ``B^T a``.
        theta: ``(R, r)`` starting dual points, updated in place.
        max_iter: steps at most per row.
        tol: gradient norm at which a row is done.
        regularization, floor: the Levenberg-Marquardt term ``regularization * ||g|| + floor``.
        iterations: ``(R,)`` int64, filled with each row's steps.
        converged: ``(R,)`` bool, filled.
    """
    rows, r = c.shape
    n = bases.shape[1]
    u = np.empty(n)
    w = np.empty(n)
    breaks = np.empty(n)
    order_buffer = np.empty(n, dtype=np.int64)
    support = np.zeros(n, dtype=np.bool_)
    key_used = np.zeros(n, dtype=np.bool_)
    column_used = np.zeros(r, dtype=np.bool_)
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
        step_count = 0
        # Which keys (rows of B) and columns are not identically zero (padding keys, columns
        # beyond the rank): the Gram matrix of all keys is the identity on the used columns.
        column_used[:] = False
        for i in range(n):
            key_used[i] = False
            for k in range(r):
                if basis[i, k] != 0.0:
                    key_used[i] = True
                    column_used[k] = True
        while True:
            if step_count % REFRESH_STEPS == 0:
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
            size = 0
            for i in range(n):
                inside = u[i] > 0.0
                size += inside
                changes += inside != support[i]
            if 2 * changes < size:
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
                # B^T B is the identity on the basis's non-zero columns: when fewer keys lie
                # outside the support than inside, subtract theirs from it instead.
                outside = size < n - size
                gram[:, :] = 0.0
                if not outside:
                    for p in range(r):
                        gram[p, p] = 1.0 if column_used[p] else 0.0
                for i in range(n):
                    inside = u[i] > 0.0
                    support[i] = inside
                    if inside == outside and key_used[i]:
                        sign = 1.0 if inside else -1.0
                        for p in range(r):
                            scaled = sign * basis[i, p]
                            for q in range(r):
                                gram[p, q] += scaled * basis[i, q]
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
            for i in range(n):
                u[i] += step * w[i]
            step_count += 1
        iterations[row] = step_count
