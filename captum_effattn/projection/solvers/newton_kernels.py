"""The compiled kernels of :mod:`.compiled_newton` (imports numba: only where it is installed).

Plain loops over NumPy arrays, one row at a time; numba compiles them on first use and caches the
machine code on disk (``cache=True``), so later processes load them instead of compiling. The
``*_blocks`` drivers run blocks of rows on numba's own thread pool (``prange``), whose OpenMP or TBB
threads run their blocks without the GIL or a Python hand-off.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Reassociation lets LLVM vectorize the dot products (sums in a different order, same accuracy).
FAST_MATH = {"reassoc", "contract"}
# Crossings the line search finds by scanning for the nearest breakpoint before it heaps the rest
# (2, 4 and 16 were no faster on MiniLM's [CLS] rows).
SELECTED_CROSSINGS = 8
# Keys from which :func:`add_keys_to_gram` sums in tiles rather than four keys per pass (4 and 16
# were within 2% of it on MiniLM's [CLS] rows at n = 128 and 256).
TILED_KEYS = 8
# ``u = B theta`` is carried along the steps (``u + t w``) and recomputed every this many steps,
# so rounding cannot pile up.
REFRESH_STEPS = 8


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def shifted_cholesky(matrix, shift, shift_matrix, factor):  # pragma: no cover - compiled
    """Lower Cholesky factor of ``matrix + shift * shift_matrix`` (SPD; their lower triangles are
    read) into ``factor``; False if not PD. The sum is formed entry by entry as the factorization
    reads it, not copied into a matrix of its own first.

    Column by column; below the diagonal four rows at a time, which share each load of the
    pivot row (1.26 against 1.79 us at ``r = 33``: it runs once per Newton step).
    """
    r = matrix.shape[0]
    for j in range(r):
        pivot_row = factor[j]
        total = matrix[j, j] + shift * shift_matrix[j, j]
        for k in range(j):
            total -= pivot_row[k] * pivot_row[k]
        if not total > 0.0:
            return False
        pivot = math.sqrt(total)
        pivot_row[j] = pivot
        i = j + 1
        while i + 4 <= r:
            row0, row1, row2, row3 = factor[i], factor[i + 1], factor[i + 2], factor[i + 3]
            total0 = matrix[i, j] + shift * shift_matrix[i, j]
            total1 = matrix[i + 1, j] + shift * shift_matrix[i + 1, j]
            total2 = matrix[i + 2, j] + shift * shift_matrix[i + 2, j]
            total3 = matrix[i + 3, j] + shift * shift_matrix[i + 3, j]
            for k in range(j):
                entry = pivot_row[k]
                total0 -= row0[k] * entry
                total1 -= row1[k] * entry
                total2 -= row2[k] * entry
                total3 -= row3[k] * entry
            row0[j], row1[j] = total0 / pivot, total1 / pivot
            row2[j], row3[j] = total2 / pivot, total3 / pivot
            i += 4
        while i < r:
            row = factor[i]
            total = matrix[i, j] + shift * shift_matrix[i, j]
            for k in range(j):
                total -= row[k] * pivot_row[k]
            row[j] = total / pivot
            i += 1
    return True


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def cholesky_factor(matrix, factor):  # pragma: no cover - compiled
    """Lower Cholesky factor of the SPD ``matrix`` into ``factor``; False if not PD."""
    return shifted_cholesky(matrix, 0.0, matrix, factor)


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def lower_solve(factor, rhs, out):  # pragma: no cover - compiled
    """``out = L^{-1} rhs`` for the lower triangle ``L`` of ``factor``."""
    for i in range(factor.shape[0]):
        total = rhs[i]
        for k in range(i):
            total -= factor[i, k] * out[k]
        out[i] = total / factor[i, i]


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def factored_solve(factor, rhs, out):  # pragma: no cover - compiled
    """Solve ``L L^T out = rhs`` for the lower triangle ``L`` of ``factor``."""
    lower_solve(factor, rhs, out)  # L y = rhs
    # L^T out = y, bottom up: each solved entry is taken out of the ones above it along a row
    # of L (contiguous; a column of L, as the dot-product form reads, is strided): 0.62 against
    # 1.06 us for the whole solve at r = 33.
    for i in range(factor.shape[0] - 1, -1, -1):
        out[i] /= factor[i, i]
        solved = out[i]
        row = factor[i]
        for k in range(i):
            out[k] -= row[k] * solved


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def slope_terms(u, w, max_step):  # pragma: no cover - compiled
    """``phi'(t) = s - alpha - beta t`` at ``t = 0+``, and ``sum_i w_i relu(u_i + max_step w_i)``
    (``phi'(max_step) = s`` minus it).

    Returns ``(alpha, beta, at_bound)``. Sums only, no stores: the loop vectorizes (the
    breakpoints, which only a step short of ``max_step`` needs, are :func:`crossings`).
    """
    alpha = 0.0
    beta = 0.0
    at_bound = 0.0
    for i in range(u.shape[0]):
        ui, wi = u[i], w[i]
        positive = (ui > 0.0) | ((ui == 0.0) & (wi > 0.0))
        weight = wi if positive else 0.0
        alpha += weight * ui
        beta += weight * wi
        # (At an unbounded max_step a key with w = 0 gives 0 * inf = NaN: counted as not positive.)
        end = ui + max_step * wi
        at_bound += wi * end if end > 0.0 else 0.0
    return alpha, beta, at_bound


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def crossings(u, w, breaks, order_buffer):  # pragma: no cover - compiled
    """Every breakpoint ``t > 0`` of ``phi'``: ``breaks[:moving]`` are the steps where a key
    crosses 0, ``order_buffer[:moving]`` those keys; returns ``moving``."""
    moving = 0
    # Without branches: which keys cross 0 follows no pattern the branch predictor can learn
    # (half the loop's time went to its misses). Every key's crossing is written to the next
    # free slot, which only a crossing key keeps.
    for i in range(u.shape[0]):
        ui, wi = u[i], w[i]
        breaks[moving] = -ui / (wi if wi != 0.0 else 1.0)
        order_buffer[moving] = i
        moving += ((wi > 0.0) & (ui < 0.0)) | ((wi < 0.0) & (ui > 0.0))
    return moving


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def sift_down(breaks, keys, base, node, end):  # pragma: no cover - compiled
    """Restore the min-heap ``breaks[base:end]`` (children of relative position ``p`` at
    ``2p + 1`` and ``2p + 2``; ``keys`` move along) below ``node``, its only misplaced entry."""
    while True:
        child = base + 2 * (node - base) + 1
        if child >= end:
            return
        if child + 1 < end and breaks[child + 1] < breaks[child]:
            child += 1
        if not breaks[child] < breaks[node]:
            return
        breaks[node], breaks[child] = breaks[child], breaks[node]
        keys[node], keys[child] = keys[child], keys[node]
        node = child


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def exact_step(u, w, slope0, breaks, order_buffer, max_step):  # pragma: no cover - compiled
    """``0 <= t <= max_step`` maximizing ``t s - 1/2 ||relu(u + t w)||^2`` (see
    :func:`captum_effattn.projection.solvers.newton.exact_step`).

    ``phi'`` is non-increasing and piecewise linear: the breakpoints are swept nearest first until
    ``phi'`` turns non-positive, and the maximizer lies on that segment. Most steps cross a few:
    the nearest is selected by a scan; after :data:`SELECTED_CROSSINGS` crossings the rest become
    a min-heap (in place: sorting them allocated, and cost more than the scans it saved) and are
    taken from it one by one; the sweep stops at ``max_step`` (no breakpoint beyond it matters).
    ``phi`` must be bounded above on the interval, as it is along every Newton direction (the dual
    is bounded: P(a) is not empty).

    First of all, ``phi'(max_step)`` (a finite bound), in the pass that sums the slope's terms:
    where it is not negative, ``phi`` rises all the way and the step is ``max_step`` without a
    sweep, and without the breakpoints, which a second pass computes only for the other steps.
    Newton's first steps from the projected start are mostly full steps that cross dozens of
    breakpoints (MiniLM, every row at n = 256: 43 and 22 crossings on the first two steps, 98% or
    more of them full), and sweeping those took a tenth of the solver's time; computing every
    key's breakpoint in the same pass as the sums kept that pass from vectorizing (the solver
    alone took 0.95x-0.96x its time with two passes; summed in another order, 8 of 493,648 steps
    on every row of three reviews moved with the rounding).
    """
    alpha, beta, at_bound = slope_terms(u, w, max_step)
    if max_step < math.inf and slope0 - at_bound >= 0.0:
        return max_step
    moving = crossings(u, w, breaks, order_buffer)
    m = 0
    end = moving
    while m < end:
        if m < SELECTED_CROSSINGS:
            nearest = m
            for j in range(m + 1, end):
                if breaks[j] < breaks[nearest]:
                    nearest = j
            breaks[m], breaks[nearest] = breaks[nearest], breaks[m]
            order_buffer[m], order_buffer[nearest] = order_buffer[nearest], order_buffer[m]
        elif m == SELECTED_CROSSINGS and end == moving:
            for node in range(m + (end - m - 2) // 2, m - 1, -1):
                sift_down(breaks, order_buffer, m, node, end)
        t = breaks[m]
        if t >= max_step or slope0 - alpha - beta * t <= 0.0:
            break
        i = order_buffer[m]
        sign = 1.0 if w[i] > 0.0 else -1.0
        alpha += sign * w[i] * u[i]
        beta += sign * w[i] * w[i]
        if m < SELECTED_CROSSINGS:
            m += 1
        else:  # take the heap's root out: its last entry goes to the root and sifts down
            end -= 1
            breaks[m], order_buffer[m] = breaks[end], order_buffer[end]
            sift_down(breaks, order_buffer, m, m, end)
    step = (slope0 - alpha) / max(beta, 2.2250738585072014e-308)
    return min(max(step, 0.0), max_step)


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def add_key_to_gram(gram, basis, i, sign):  # pragma: no cover - compiled
    """``gram += sign * m_i m_i^T`` on the lower triangle, ``m_i`` row ``i`` of ``basis``."""
    for p in range(basis.shape[1]):
        scaled = sign * basis[i, p]
        for q in range(p + 1):
            gram[p, q] += scaled * basis[i, q]


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def add_keys_to_gram(gram, basis, keys, signs, count, scratch):  # pragma: no cover - compiled
    """``gram += sum_j signs[j] m_k m_k^T`` over ``k = keys[j]``, ``j < count``, on the lower
    triangle. Many keys (the first steps' supports) are copied column-major into ``scratch``
    (two ``(r, >= n)`` arrays: the signed and the plain rows) and summed in tiles
    (:func:`add_column_products`); a few are added four per pass over ``gram``, which then is
    read and written a quarter as often as key by key."""
    if count >= TILED_KEYS:
        signed, plain = scratch
        for j in range(count):
            row, sign = basis[keys[j]], signs[j]
            for p in range(row.shape[0]):
                plain[p, j] = row[p]
                signed[p, j] = sign * row[p]
        add_column_products(gram, signed, plain, count)
        return
    r = basis.shape[1]
    j = 0
    while j + 4 <= count:
        m0, m1, m2, m3 = basis[keys[j]], basis[keys[j + 1]], basis[keys[j + 2]], basis[keys[j + 3]]
        s0, s1, s2, s3 = signs[j], signs[j + 1], signs[j + 2], signs[j + 3]
        for p in range(r):
            a0, a1, a2, a3 = s0 * m0[p], s1 * m1[p], s2 * m2[p], s3 * m3[p]
            row = gram[p]
            for q in range(p + 1):
                row[q] += a0 * m0[q] + a1 * m1[q] + a2 * m2[q] + a3 * m3[q]
        j += 4
    while j < count:
        add_key_to_gram(gram, basis, keys[j], signs[j])
        j += 1


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def add_column_products(gram, left, right, count):  # pragma: no cover - compiled
    """``gram += left[:, :count] @ right[:, :count]^T`` on the lower triangle, for column-major
    copies ``left`` and ``right`` ``(r, >= count)`` of keys' rows (``left`` may carry a sign per
    key, or be ``right`` itself): the sum of their outer products. Some entries above the
    diagonal are updated too (tiles straddle it); nothing reads them.

    In tiles of 3 x 4 entries whose twelve sums run along the keys together: seven loads feed
    twelve products, and the loop over the keys vectorizes (the Gram matrix of 128 keys in 3.5
    against 10 us four keys per pass, 13 against 40 us for 512 keys, ``r = 33``, one thread).
    """
    r = gram.shape[0]
    last = r - 1
    for p in range(0, r, 3):
        # Rows past the end repeat the last one; their sums are not stored.
        p1, p2 = min(p + 1, last), min(p + 2, last)
        x0, x1, x2 = left[p], left[p1], left[p2]
        for q in range(0, min(p + 3, r), 4):
            q1, q2, q3 = min(q + 1, last), min(q + 2, last), min(q + 3, last)
            y0, y1, y2, y3 = right[q], right[q1], right[q2], right[q3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = s20 = s21 = s22 = s23 = 0.0
            for i in range(count):
                a0, a1, a2 = x0[i], x1[i], x2[i]
                b0, b1, b2, b3 = y0[i], y1[i], y2[i], y3[i]
                s00 += a0 * b0
                s01 += a0 * b1
                s02 += a0 * b2
                s03 += a0 * b3
                s10 += a1 * b0
                s11 += a1 * b1
                s12 += a1 * b2
                s13 += a1 * b3
                s20 += a2 * b0
                s21 += a2 * b1
                s22 += a2 * b2
                s23 += a2 * b3
            store_tile_row(gram[p], q, s00, s01, s02, s03)
            if p + 1 <= last:
                store_tile_row(gram[p + 1], q, s10, s11, s12, s13)
            if p + 2 <= last:
                store_tile_row(gram[p + 2], q, s20, s21, s22, s23)


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def store_tile_row(row, q, s0, s1, s2, s3):  # pragma: no cover - compiled
    """``row[q:q + 4] += (s0, s1, s2, s3)``, the entries that exist."""
    last = row.shape[0] - 1
    row[q] += s0
    if q + 3 <= last:
        row[q + 1] += s1
        row[q + 2] += s2
        row[q + 3] += s3
    else:
        if q + 1 <= last:
            row[q + 1] += s1
        if q + 2 <= last:
            row[q + 2] += s2


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def dot(first, second):  # pragma: no cover - compiled
    """``first @ second`` for two vectors, as a loop: ``np.sum(first * second)`` allocates the
    product on the heap, twice per Newton step."""
    total = 0.0
    for k in range(first.shape[0]):
        total += first[k] * second[k]
    return total


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def rows_times(basis, vector, out):  # pragma: no cover - compiled
    """``out = basis @ vector``: ``(n, r) @ (r,) -> (n,)``, four rows at a time (they share the
    loads of ``vector``: 0.44 against 0.52 us at ``n = 128``, ``r = 33``)."""
    n, r = basis.shape
    i = 0
    while i + 4 <= n:
        row0, row1, row2, row3 = basis[i], basis[i + 1], basis[i + 2], basis[i + 3]
        total0, total1, total2, total3 = 0.0, 0.0, 0.0, 0.0
        for k in range(r):
            entry = vector[k]
            total0 += row0[k] * entry
            total1 += row1[k] * entry
            total2 += row2[k] * entry
            total3 += row3[k] * entry
        out[i], out[i + 1], out[i + 2], out[i + 3] = total0, total1, total2, total3
        i += 4
    while i < n:
        out[i] = dot(basis[i], vector)
        i += 1


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def dual_gradient(basis, u, target, gradient, positive):  # pragma: no cover - compiled
    """``gradient = target - M^T relu(u)``; ``positive`` ``(n,)`` is scratch for the keys with
    ``u > 0``.

    The positive keys are listed first, without branches (their pattern defeats the branch
    predictor), then taken four per pass over ``gradient`` (0.27 against 0.45 us at ``n = 128``,
    ``r = 33``, with about a third of the keys positive)."""
    count = 0
    for i in range(u.shape[0]):
        positive[count] = i
        count += u[i] > 0.0
    gradient[:] = target
    r = basis.shape[1]
    j = 0
    while j + 4 <= count:
        key0, key1, key2, key3 = positive[j], positive[j + 1], positive[j + 2], positive[j + 3]
        row0, row1, row2, row3 = basis[key0], basis[key1], basis[key2], basis[key3]
        u0, u1, u2, u3 = u[key0], u[key1], u[key2], u[key3]
        for k in range(r):
            gradient[k] -= row0[k] * u0 + row1[k] * u1 + row2[k] * u2 + row3[k] * u3
        j += 4
    while j < count:
        row, weight = basis[positive[j]], u[positive[j]]
        for k in range(r):
            gradient[k] -= row[k] * weight
        j += 1


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def lower_times(factor, vector, out):  # pragma: no cover - compiled
    """``out = L @ vector`` for the lower triangle ``L`` of ``factor``."""
    for i in range(factor.shape[0]):
        out[i] = dot(factor[i, : i + 1], vector[: i + 1])


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def scaled_gradient_norm(
    basis, metric_inverse, u, target, gradient, scaled_gradient, positive
):  # pragma: no cover - compiled
    """``||L^{-1} (target - M^T relu(u))||`` for the metric's lower-triangular inverse ``L^{-1}``
    (``metric_inverse``); leaves the gradient in ``gradient`` and its scaled version in
    ``scaled_gradient`` (``positive``: scratch, see :func:`dual_gradient`). A product with
    ``L^{-1}``, whose rows are independent dot products, is cheaper than a solve with ``L`` (0.11
    against 0.27 us at ``r = 33``)."""
    dual_gradient(basis, u, target, gradient, positive)
    lower_times(metric_inverse, gradient, scaled_gradient)
    return math.sqrt(dot(scaled_gradient, scaled_gradient))


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def support_changes(u, support):  # pragma: no cover - compiled
    """``(changes, size)``: keys entering or leaving the support ``u > 0``, and its size."""
    changes = 0
    size = 0
    for i in range(u.shape[0]):
        inside = u[i] > 0.0
        size += inside
        changes += inside != support[i]
    return changes, size


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def update_support_gram(
    basis, key_used, full_gram, u, support, gram, moved, signs, scratch
):  # pragma: no cover - compiled
    """The support's Gram matrix ``M_S^T M_S`` (its lower triangle: all the Cholesky
    factorization reads), updated from the keys that moved when they are few, otherwise rebuilt
    from the Gram matrix of all keys (``full_gram``) or from nothing, whichever touches fewer
    keys. ``moved`` and ``signs`` ``(n,)`` are scratch for the keys added (+1) or removed (-1),
    ``scratch`` that of :func:`add_keys_to_gram`."""
    n = u.shape[0]
    changes, size = support_changes(u, support)
    count = 0
    if 2 * changes < size:
        for i in range(n):
            inside = u[i] > 0.0
            if inside != support[i]:
                moved[count] = i
                signs[count] = 1.0 if inside else -1.0
                count += 1
                support[i] = inside
    else:
        outside = size < n - size
        if outside:
            gram[:, :] = 0.0
        else:
            gram[:, :] = full_gram
        for i in range(n):
            inside = u[i] > 0.0
            support[i] = inside
            if inside == outside and key_used[i]:
                moved[count] = i
                signs[count] = 1.0 if inside else -1.0
                count += 1
    add_keys_to_gram(gram, basis, moved, signs, count, scratch)


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def regularized_direction(
    gram, regularizer, gradient, mu, factor, direction
):  # pragma: no cover - compiled
    """Solve ``(gram + mu * regularizer) direction = gradient``, damping more (``mu * 10``)
    while rounding leaves the regularized matrix indefinite.

    A matrix no damping makes positive definite (a NaN in it) gives a zero direction, hence a
    zero step: the row runs out of steps and goes to the basis route, instead of the loop
    damping forever in compiled code that nothing can interrupt.
    """
    while not shifted_cholesky(gram, mu, regularizer, factor):
        mu *= 10.0
        if not mu < 1e300:
            direction[:] = 0.0
            return
    factored_solve(factor, gradient, direction)


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def newton_row(geometry, target, th, settings, buffers):  # pragma: no cover - compiled
    """Newton steps on ``max th^T target - 1/2 ||relu(M th)||^2`` for one row until the gradient's
    norm, measured as ``||L^{-1} gradient||`` for a metric ``L``, is at most ``tol``.

    ``M`` (``basis``, ``(n, r)``) is an orthonormal basis (``full_gram`` = identity on its used
    columns, ``regularizer`` = ``L^{-1}`` = identity) or the unit columns of ``[1, V]`` themselves
    (``full_gram`` = ``regularizer`` = their Gram matrix ``G``, ``L`` its Cholesky factor).
    Newton's method is invariant under the change of coordinates ``th = L^T theta``; with the
    Levenberg-Marquardt term taken as ``mu * G`` and the gradient measured through ``L`` both run
    the same steps in key space (``M th`` is the same vector).

    Args:
        geometry: ``(basis, key_used, full_gram, regularizer, metric_inverse)``; ``key_used``
            ``(n,)`` the keys whose row of ``M`` is not zero, ``metric_inverse`` ``L^{-1}``
            (its lower triangle).
        target: ``(r,)`` the row's coordinates.
        th: ``(r,)`` starting point, updated in place.
        settings: ``(max_iter, tol, regularization, floor, max_step)``.
        buffers: from :func:`_buffers`.

    Returns:
        ``(steps, converged)``; when converged, ``u`` (``buffers[1][0]``) is ``M th`` computed
        afresh from the final ``th``.
    """
    basis, key_used, full_gram, regularizer, metric_inverse = geometry
    max_iter, tol, regularization, floor, max_step = settings
    work, keys, (breaks, order_buffer, support, gram, factor, moved, signs), scratch = buffers
    gradient, direction, scaled_gradient = work[0], work[1], work[2]
    u, w = keys[0], keys[1]
    support[:] = False
    gram[:, :] = 0.0
    step_count = 0
    while True:
        if step_count % REFRESH_STEPS == 0:
            rows_times(basis, th, u)
        # ``moved`` is scratch here: the support's update below fills it afresh.
        norm = scaled_gradient_norm(
            basis, metric_inverse, u, target, gradient, scaled_gradient, moved
        )
        if norm <= tol and step_count % REFRESH_STEPS != 0:
            # The carried ``u`` drifts by the rounding of its updates, far beyond ``tol`` when
            # ``th`` is large (near-one-hot rows): confirm convergence on a fresh one.
            rows_times(basis, th, u)
            norm = scaled_gradient_norm(
                basis, metric_inverse, u, target, gradient, scaled_gradient, moved
            )
        if norm <= tol:
            return step_count, True  # with ``u`` fresh: callers read the row off it
        if step_count == max_iter:
            return step_count, False
        update_support_gram(basis, key_used, full_gram, u, support, gram, moved, signs, scratch)
        mu = regularization * norm + floor
        regularized_direction(gram, regularizer, gradient, mu, factor, direction)
        rows_times(basis, direction, w)
        step = exact_step(u, w, dot(direction, target), breaks, order_buffer, max_step)
        for k in range(th.shape[0]):
            th[k] += step * direction[k]
        for i in range(u.shape[0]):
            u[i] += step * w[i]
        step_count += 1


@njit(cache=True, nogil=True)
def _buffers(n, r):  # pragma: no cover - compiled
    return (
        np.empty((3, r)),
        np.empty((3, n)),
        (
            np.empty(n),
            np.empty(n, dtype=np.int64),
            np.zeros(n, dtype=np.bool_),
            np.zeros((r, r)),
            np.zeros((r, r)),
            np.empty(n, dtype=np.int64),
            np.empty(n),
        ),
        # Column-major copies of keys' rows (:func:`add_keys_to_gram`); a row stride of ``n``
        # doubles maps a key's entries to one cache set where ``n`` is a power of two (n = 512:
        # the geometry took 1.25x the time of the key-by-key Gram matrix it replaced).
        (np.empty((r, n + 8)), np.empty((r, n + 8))),
    )


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def used_keys_and_columns(basis, key_used, full_gram):  # pragma: no cover - compiled
    """Which keys (rows of ``basis``) and columns are not identically zero (padding keys,
    columns beyond the rank): the Gram matrix of all keys is the identity on the used columns."""
    full_gram[:, :] = 0.0
    for i in range(basis.shape[0]):
        key_used[i] = False
        for k in range(basis.shape[1]):
            if basis[i, k] != 0.0:
                key_used[i] = True
                full_gram[k, k] = 1.0


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def newton_rows(bases, group, c, theta, settings, iterations, converged):  # pragma: no cover
    """Newton steps for each row until its dual gradient norm is at most ``tol``.

    Args:
        bases: ``(G, n, r)`` orthonormal bases.
        group: ``(R,)`` basis of each row.
        c: ``(R, r)`` the rows' coordinates ``B^T a``.
        theta: ``(R, r)`` starting dual points, updated in place.
        settings: ``(max_iter, tol, regularization, floor, max_step)``: steps at most per row,
            the gradient norm at which a row is done, the Levenberg-Marquardt term
            ``regularization * ||g|| + floor``, and the longest step along a direction.
        iterations: ``(R,)`` int64, filled with each row's steps.
        converged: ``(R,)`` bool, filled.
    """
    rows, r = c.shape
    n = bases.shape[1]
    buffers = _buffers(n, r)
    key_used = np.zeros(n, dtype=np.bool_)
    full_gram = np.zeros((r, r))
    identity = np.eye(r)
    for row in range(rows):
        basis = bases[group[row]]
        used_keys_and_columns(basis, key_used, full_gram)
        geometry = (basis, key_used, full_gram, identity, identity)
        iterations[row], converged[row] = newton_row(
            geometry, c[row], theta[row], settings, buffers
        )


@intrinsic
def fetch_add(typingctx, counter, amount):  # pragma: no cover - compiled
    """``counter[0] += amount`` as one atomic operation, returning the value before: threads
    that call it at once each get a value of their own."""
    signature = types.int64(types.Array(types.int64, 1, "C"), types.int64)

    def codegen(context, builder, sig, args):
        array, added = args
        array_type = sig.args[0]
        first = cgutils.get_item_pointer(
            context,
            builder,
            array_type,
            context.make_array(array_type)(context, builder, array),
            [context.get_constant(types.intp, 0)],
        )
        return builder.atomic_rmw("add", first, added, "seq_cst")

    return signature, codegen


@njit(cache=True, nogil=True)
def claim_block(counter, rows, block):  # pragma: no cover - compiled
    """Rows ``[start, stop)`` of the next unclaimed block of ``block`` rows (``counter``: the
    first unclaimed row, shared by the threads); ``start >= rows`` once every row is claimed.

    Each thread of a parallel driver claims blocks until none is left, so a thread that starts
    late or runs slowly (PyTorch's OpenMP threads still spin on the cores for a while after a
    forward pass; one head's near-one-hot rows need hundreds of steps) leaves its share to the
    others. ``prange`` alone splits its range into equal runs up front, one per thread: with
    blocks claimed, MiniLM's 72 [CLS] rows on two threads took 4.1-4.4 instead of 5.1-5.2 ms
    right after a forward pass (n = 128, 40 interleaved rounds, two runs), 4.1-4.7 instead of
    4.2-5.3 ms inside ``attribute`` (and 576 rows at batch 8 31-32 instead of 37-39 ms).
    """
    start = fetch_add(counter, block)
    return start, min(start + block, rows)


@njit(cache=True, nogil=True, parallel=True)
def newton_blocks(
    bases, group, c, theta, settings, iterations, converged, block, threads
):  # pragma: no cover - compiled
    """:func:`newton_rows` over blocks of ``block`` consecutive rows on ``threads`` threads, each
    claiming the next block as it becomes free (:func:`claim_block`)."""
    rows = c.shape[0]
    counter = np.zeros(1, dtype=np.int64)
    for _ in prange(threads):
        while True:
            start, stop = claim_block(counter, rows, block)
            if start >= rows:
                break
            newton_rows(
                bases,
                group[start:stop],
                c[start:stop],
                theta[start:stop],
                settings,
                iterations[start:stop],
                converged[start:stop],
            )


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def gather_columns(values, key_mask, columns):  # pragma: no cover - compiled
    """``columns[:, :count] = W^T`` over the real keys, in their order (column-major: each
    column of ``W`` contiguous), ``W = [1, V]`` when ``columns`` has ``d + 1`` rows and ``V``
    itself when it has ``d``; returns ``count``, the number of real keys."""
    first = columns.shape[0] - values.shape[1]  # 1: a column of ones comes first
    count = 0
    for i in range(values.shape[0]):
        if key_mask[i]:
            if first:
                columns[0, count] = 1.0
            for k in range(values.shape[1]):
                columns[k + first, count] = values[i, k]
            count += 1
    return count


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def unit_columns(values, key_mask, out, norms, gram, columns):  # pragma: no cover - compiled
    """``out = W``, the columns of ``[1, V]`` (``out`` ``(n, d + 1)``) or of ``V`` itself (``out``
    ``(n, d)``) on the real keys scaled to unit norm (zero rows on padding), and their Gram matrix
    ``W^T W`` (lower triangle) into ``gram``; ``norms`` ``(d,)`` gets the norms of ``V``'s columns
    (what ``V``'s part of ``out`` was divided by); ``columns`` (as many rows as ``out`` has
    columns, ``>= n`` columns) is scratch.

    The Gram matrix of ``[1, V]`` as it stands comes first, from a column-major copy (tiles:
    :func:`add_column_products`); its diagonal gives the norms, and scaling it ``W``'s Gram
    matrix. The whole geometry of a [CLS] row of MiniLM (this, the factorization and its
    inverse) took 16 instead of 24 us at n = 128 and 45 instead of 75 us at n = 512, against
    scaling the columns first and summing ``W``'s outer products four keys per pass.

    Returns False, leaving the row to the general path, when the real keys do not outnumber the
    columns (the row may be identifiable as it stands, or the columns dependent) or a column's
    norm is below :data:`VALUE_RANGE` (zero, or its products lost to underflow).
    """
    n, d = values.shape
    r = out.shape[1]
    first = r - d  # 1: a column of ones comes first
    count = gather_columns(values, key_mask, columns)
    if count <= r:
        return False
    gram[:, :] = 0.0
    add_column_products(gram, columns, columns, count)
    scale = np.empty(r)
    if first:
        scale[0] = 1.0 / math.sqrt(count)
    for k in range(d):
        # The sums of products are of the values as given: a column whose norm lies below the
        # values' range would have lost them to underflow (a zero column too).
        if not gram[k + first, k + first] > VALUE_RANGE[0] ** 2:
            return False
        norms[k] = math.sqrt(gram[k + first, k + first])
        scale[k + first] = 1.0 / norms[k]
    for p in range(r):
        for q in range(p + 1):
            gram[p, q] *= scale[p] * scale[q]
    for i in range(n):
        if key_mask[i]:
            if first:
                out[i, 0] = scale[0]
            for k in range(d):
                out[i, k + first] = values[i, k] * scale[k + first]
        else:
            out[i, :] = 0.0
    return True


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def inverse_frobenius(factor, inverse):  # pragma: no cover - compiled
    """``||L^{-1}||_F`` for the lower triangular ``L`` in ``factor``; ``L^{-1}`` is left in the
    lower triangle of ``inverse`` ``(r, r)``.

    Row by row: ``L Y = I`` makes row ``i`` of ``Y = L^{-1}`` ``(e_i - sum_{k<i} L_ik Y_k) / L_ii``,
    a sum of earlier rows (contiguous), with one division per row; column by column, every entry
    was a short strided dot product and a division (10.4 against 5.6 us at ``r = 33``).
    """
    r = factor.shape[0]
    total = 0.0
    for i in range(r):
        row = inverse[i]
        for c in range(i):
            row[c] = 0.0
        row[i] = 1.0
        coefficients = factor[i]
        for k in range(i):
            coefficient = coefficients[k]
            earlier = inverse[k]
            for c in range(k + 1):
                row[c] -= coefficient * earlier[c]
        scale = 1.0 / coefficients[i]
        for c in range(i + 1):
            row[c] *= scale
            total += row[c] * row[c]
    return math.sqrt(total)


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def value_geometry(
    values, key_mask, max_inverse_norm, matrix, norms, gram, metric, metric_inverse, columns
):  # pragma: no cover - compiled
    """Unit columns ``W = [1, V]`` (or ``V``, see :func:`unit_columns`) into ``matrix`` (``V``'s
    column norms into ``norms``), their
    Gram matrix (full) into ``gram``, its Cholesky factor ``L`` into ``metric`` and ``L^{-1}``
    into the lower triangle of ``metric_inverse``; False when ``W`` is not comfortably of full
    column rank (``||L^{-1}||_F > max_inverse_norm``) or :func:`unit_columns` refuses it.
    ``columns`` ``(r, >= n)`` is scratch."""
    if not unit_columns(values, key_mask, matrix, norms, gram, columns):
        return False
    r = matrix.shape[1]
    for p in range(r):
        for q in range(p):
            gram[q, p] = gram[p, q]
    if not cholesky_factor(gram, metric):
        return False
    return inverse_frobenius(metric, metric_inverse) <= max_inverse_norm


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def columns_times(matrix, vector, out):  # pragma: no cover - compiled
    """``out = matrix^T @ vector``: ``(n, r)^T @ (n,) -> (r,)``."""
    n, r = matrix.shape
    out[:] = 0.0
    for i in range(n):  # row by row: the rows of ``matrix`` are contiguous
        weight = vector[i]
        if weight != 0.0:
            for k in range(r):
                out[k] += matrix[i, k] * weight


# Values whose largest magnitude on a row's keys lies outside this range are left to the general
# path, which divides them by it first: inside it no square or product below can overflow or
# underflow in float64 (float32 and half-precision values always lie inside).
VALUE_RANGE = (1e-100, 1e100)


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def largest_magnitude(values, key_mask):  # pragma: no cover - compiled
    """``max |values[i, k]|`` over the keys ``i`` of ``key_mask``."""
    largest = 0.0
    for i in range(values.shape[0]):
        if key_mask[i]:
            for k in range(values.shape[1]):
                largest = max(largest, abs(float(values[i, k])))
    return largest


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def output_error_of_row(matrix, norms, x, a, coordinates, difference, change):  # pragma: no cover
    """``||(x - a) V|| / ||a V||``, as :func:`captum_effattn.projection.engine.certify.output_error`
    measures it, from the unit columns ``W = [1, V]`` (``matrix`` ``(n, d + 1)``; or ``V``,
    ``(n, d)``) and ``V``'s column norms ``norms`` ``(d,)``: ``(x - a) V`` is ``V``'s part of
    ``(x - a) W`` times ``norms``, recomputed from ``x`` itself (not from the solver's gradient).
    ``coordinates`` ``(r,)`` is ``a W``; ``difference`` ``(n,)`` and ``change`` ``(r,)`` are
    scratch.

    From ``W`` (float64, in cache, ``a W`` already known) and not from ``V`` as given: summing
    ``(x - a) V`` and ``a V`` in one pass over ``V``, whose two accumulator arrays numba cannot
    prove apart, made every row of a MiniLM layer at n = 256 take 282-287 instead of 231-237 ms
    of thread time; this way 234-257 ms, against 229-266 ms for the kernel before it measured."""
    for i in range(x.shape[0]):
        difference[i] = x[i] - a[i]
    columns_times(matrix, difference, change)
    first = matrix.shape[1] - norms.shape[0]  # 1: a column of ones comes first
    moved = 0.0
    reference = 0.0
    for k in range(norms.shape[0]):
        moved += (norms[k] * change[k + first]) ** 2
        reference += (norms[k] * coordinates[k + first]) ** 2
    return math.sqrt(moved) / max(math.sqrt(reference), 2.2250738585072014e-308)


@njit(cache=True, fastmath=FAST_MATH, nogil=True)
def value_newton_rows(
    values,
    key_mask,
    source,
    prefix,
    rows,
    settings,
    max_inverse_norm,
    x,
    error,
    iterations,
    converged,
    project_only,
):  # pragma: no cover - compiled
    """Efficient attention rows by Newton in the coordinates of ``W = [1, V]`` (unit columns);
    with ``project_only``, effective attention rows: each row's orthogonal projection onto the
    span of ``W = V`` (no column of ones, no Newton step, no normalization).

    No orthonormal basis is built: ``W``'s Gram matrix ``G = L L^T`` and its Cholesky factor
    serve as the metric of :func:`newton_row`, which then takes exactly the steps it takes with an
    orthonormal basis of the same space. Rows whose ``W`` is not comfortably of full column rank
    (``||L^{-1}||_F > max_inverse_norm``: rounding in the gradient grows with it), has no more
    columns than usable keys, or whose values lie outside :data:`VALUE_RANGE` are left out.

    The values are read as given (float32 or float64: no converted copy of them is made), and
    each row is taken on its usable keys and normalized here (efficient attention only), so the
    caller passes its rows and value vectors untouched. Effective attention here is
    ``W G^{-1} W^T a`` from the same geometry (the start of the Newton steps, on ``V``), about a
    geometry's cost a head instead of the batched float64 products of the route through PyTorch.

    Args:
        values: ``(S, n, d)`` value vectors, float32 or float64; key_mask: ``(S, n)`` real keys.
        source: ``(R,)`` the values of each row (consecutive rows with the same source and
            prefix share its factorization).
        prefix: ``(R,)`` a row may use the real keys ``j < prefix`` (``n``: all of them).
        rows: ``(R, n)`` float64 attention rows, distributions over their usable keys up to
            normalization (entries on other keys are ignored).
        settings: ``(max_iter, tol, regularization, floor, max_step)`` as in :func:`newton_rows`.
        max_inverse_norm: the conditioning limit above.
        x: ``(R, n)`` filled with the efficient rows (normalized) where converged (effective
            rows: where projected).
        error: ``(R,)`` filled with their relative head-output error where converged.
        iterations: ``(R,)`` steps taken; converged: ``(R,)`` True for rows solved here (False:
            not attempted, or not converged within ``max_iter``).
        project_only: effective attention instead of efficient (``settings`` unused).
    """
    n_rows, n = rows.shape
    d = values.shape[2]
    r = d if project_only else d + 1
    buffers = _buffers(n, r)
    matrix = np.empty((n, r))
    columns = buffers[3][0]  # scratch until the row's steps, which reuse it
    gram = np.empty((r, r))
    metric = np.zeros((r, r))
    metric_inverse = np.zeros((r, r))
    target = np.empty(r)
    th = np.empty(r)
    usable_keys = np.zeros(n, dtype=np.bool_)
    a = np.empty(n)
    norms, difference, change = np.empty(d), np.empty(n), np.empty(r)
    current_source, current_prefix = -1, -1
    usable = False
    for row in range(n_rows):
        s, p = source[row], prefix[row]
        if s != current_source or p != current_prefix:
            current_source, current_prefix = s, p
            for i in range(n):
                usable_keys[i] = key_mask[s, i] and i < p
            largest = largest_magnitude(values[s], usable_keys)
            usable = VALUE_RANGE[0] < largest < VALUE_RANGE[1]
            if usable:
                usable = value_geometry(
                    values[s],
                    usable_keys,
                    max_inverse_norm,
                    matrix,
                    norms,
                    gram,
                    metric,
                    metric_inverse,
                    columns,
                )
        converged[row] = False
        iterations[row] = 0
        error[row] = 0.0
        if not usable:
            continue
        total = 0.0
        for i in range(n):
            a[i] = rows[row, i] if usable_keys[i] else 0.0
            total += a[i]
        if project_only:
            columns_times(matrix, a, target)
            factored_solve(metric, target, th)
            rows_times(matrix, th, x[row])  # zero rows of W: zero on the keys not used
            error[row] = output_error_of_row(matrix, norms, x[row], a, target, difference, change)
            converged[row] = True
            continue
        if not total > 0.0:
            continue
        for i in range(n):
            a[i] /= total
        columns_times(matrix, a, target)
        # Start where the orthonormal route starts: W th = the projection of a onto span(W).
        factored_solve(metric, target, th)
        geometry = (matrix, usable_keys, gram, gram, metric_inverse)
        iterations[row], converged[row] = newton_row(geometry, target, th, settings, buffers)
        if not converged[row]:
            continue
        # newton_row decides convergence on ``u = W th`` computed afresh from the final ``th``:
        # its relu is the row, bit for bit (then normalized).
        u = buffers[1][0]
        mass = 0.0
        for i in range(n):
            mass += max(u[i], 0.0)
        if not mass > 0.0:
            converged[row] = False
            continue
        for i in range(n):
            x[row, i] = max(u[i], 0.0) / mass
        error[row] = output_error_of_row(matrix, norms, x[row], a, target, difference, change)


@njit(cache=True, nogil=True, parallel=True)
def value_newton_blocks(
    values,
    key_mask,
    source,
    prefix,
    rows,
    settings,
    max_inverse_norm,
    x,
    error,
    iterations,
    converged,
    project_only,
    block,
    threads,
):  # pragma: no cover - compiled
    """:func:`value_newton_rows` over blocks of ``block`` consecutive rows on ``threads``
    threads, each claiming the next block as it becomes free (:func:`claim_block`; each block
    factors the geometry of its first row again)."""
    n_rows = rows.shape[0]
    counter = np.zeros(1, dtype=np.int64)
    for _ in prange(threads):
        while True:
            start, stop = claim_block(counter, n_rows, block)
            if start >= n_rows:
                break
            value_newton_rows(
                values,
                key_mask,
                source[start:stop],
                prefix[start:stop],
                rows[start:stop],
                settings,
                max_inverse_norm,
                x[start:stop],
                error[start:stop],
                iterations[start:stop],
                converged[start:stop],
                project_only,
            )
