"""Vertices of the valid set of one attention row: purification and a primal simplex method.

One row's valid set is ``P = {x >= 0, A x = b}`` with ``A = B^T`` (``r x m``, full row rank: ``B``
an orthonormal basis of ``span([1, V])`` over the row's ``m`` real keys) and ``b = A a``. A vertex
of ``P`` is a point whose supported columns of ``A`` are linearly independent.

- :func:`purify` walks from any point of ``P`` to a vertex (Caratheodory's reduction): keys are
  visited in order; a key whose column depends on the kept ones opens a null-space direction, along
  which the point moves until a coordinate reaches zero.
- :func:`simplex` is the primal simplex method from a vertex (Dantzig's rule, Bland's rule after a
  degenerate pivot so that it cannot cycle), exact up to rounding: it maximizes a linear objective
  over ``P``. Every linear program here has ``r <= d + 1`` constraints, so a pivot is a few small
  dense solves.

Internal: numpy in float64, one row at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A column counts as dependent on others when its residual is below this fraction of its norm.
DEPENDENCE_RTOL = 1e-10
# Pivot elements of the ratio test below this are treated as zero.
PIVOT_TOL = 1e-11
# Reduced costs above this fraction of the objective's largest entry still improve it.
COST_RTOL = 1e-11
# Coordinates of a vertex at most this large are zero (mass of a distribution: absolute).
ZERO_TOL = 1e-13
# Exchanges of a kept key between two fresh inversions of the kept columns (rounding control).
REFACTOR_EVERY = 32
# Pivots per linear program, in multiples of the number of keys, before giving up.
PIVOTS_PER_KEY = 4


@dataclass
class Vertex:
    """A vertex of ``P`` with its simplex basis.

    Attributes:
        x: ``(m,)`` the point.
        basis: ``r`` keys (ascending order not required) whose columns of ``A`` are independent and
            hold the support of ``x``.
        steps: purification steps and simplex pivots spent on it.
        optimal: whether the last linear program solved on it finished.
    """

    x: np.ndarray
    basis: list[int]
    steps: int = 0
    optimal: bool = True


def _coefficients(columns: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, bool]:
    """Least-squares coefficients of ``target`` on ``columns``; whether it lies in their span."""
    coef, *_ = np.linalg.lstsq(columns, target, rcond=None)
    residual = float(np.linalg.norm(target - columns @ coef))
    return coef, residual <= DEPENDENCE_RTOL * max(float(np.linalg.norm(target)), 1e-300)


def _step_to_boundary(x: np.ndarray, keys: list[int], z: np.ndarray) -> tuple[float, int]:
    """Largest ``t`` with ``x[keys] + t z >= 0``, and the key that reaches 0 (smallest index
    among ties). ``z`` must have a negative entry."""
    falling = z < 0
    ratios = np.full(len(z), np.inf)
    ratios[falling] = x[keys][falling] / -z[falling]
    t = float(ratios.min())
    blocking = min(k for k, ratio in zip(keys, ratios, strict=True) if ratio <= t)
    return t, blocking


class _KeptColumns:
    """The kept keys and what testing a new column against theirs needs: an orthonormal basis of
    their span while they are fewer than ``r``, the inverse of their (square) matrix once they are
    ``r``, updated by one elimination step per exchanged key."""

    def __init__(self, a_matrix: np.ndarray):
        self.a_matrix = a_matrix
        self.keys: list[int] = []
        self.span = np.zeros((a_matrix.shape[0], 0))
        self.inverse: np.ndarray | None = None
        self.updates = 0

    def express(self, key: int) -> np.ndarray | None:
        """Coefficients of ``key``'s column on the kept ones (aligned with :attr:`keys`), or
        ``None`` when it is independent of them."""
        column = self.a_matrix[:, key]
        if self.inverse is not None:
            return self.inverse @ column
        residual = column - self.span @ (self.span.T @ column)
        scale = max(float(np.linalg.norm(column)), 1e-300)
        if float(np.linalg.norm(residual)) > DEPENDENCE_RTOL * scale:
            return None
        return np.linalg.lstsq(self.a_matrix[:, self.keys], column, rcond=None)[0]

    def _refactor(self) -> None:
        columns = self.a_matrix[:, self.keys]
        if len(self.keys) == self.a_matrix.shape[0]:
            self.inverse, self.updates = np.linalg.inv(columns), 0
        else:
            self.span = np.linalg.qr(columns)[0]

    def add(self, key: int) -> None:
        self.keys.append(key)
        self._refactor()

    def exchange(self, leaving: int, key: int, coefficients: np.ndarray) -> None:
        """Put ``key`` in ``leaving``'s place (``coefficients``: :meth:`express` of ``key``)."""
        position = self.keys.index(leaving)
        self.keys[position] = key
        if self.inverse is None or self.updates >= REFACTOR_EVERY:
            self._refactor()
            return
        row = self.inverse[position] / coefficients[position]
        self.inverse -= np.outer(coefficients, row)
        self.inverse[position] = row
        self.updates += 1


def purify(a_matrix: np.ndarray, x: np.ndarray, objective: np.ndarray) -> Vertex:
    """From a point ``x`` of ``P`` to a vertex whose support lies in ``x``'s support.

    Keys are visited in order; each positive key whose column of ``A`` depends on the kept keys'
    columns gives a null-space direction ``z`` (``A z = 0``). The point moves along ``z`` or ``-z``,
    whichever does not decrease ``objective . x`` (``+z`` on a tie), until a coordinate reaches
    zero (the smallest key among ties); that key leaves, the others stay independent.

    Args:
        a_matrix: ``(r, m)`` the constraint matrix ``A``.
        x: ``(m,)`` a point of ``P`` (copied).
        objective: ``(m,)`` picks the direction of each move.

    Returns:
        The vertex, its basis being its support (fewer than ``r`` keys when degenerate).
    """
    x = x.copy()
    kept = _KeptColumns(a_matrix)
    steps = 0
    for key in np.flatnonzero(x > 0).tolist():
        if x[key] <= 0:  # reached zero on an earlier move
            continue
        coefficients = kept.express(key)
        if coefficients is None:
            kept.add(key)
            continue
        keys = [*kept.keys, key]
        z = np.append(-coefficients, 1.0)
        if float(objective[keys] @ z) < 0:
            z = -z
        t, blocking = _step_to_boundary(x, keys, z)
        x[keys] = np.maximum(x[keys] + t * z, 0)
        x[blocking] = 0
        steps += 1
        if blocking != key:
            # The key left had a non-zero coefficient: the new key is independent of the rest.
            kept.exchange(blocking, key, coefficients)
    support = np.zeros(len(x), dtype=bool)
    support[kept.keys] = True
    x[~support] = 0
    return Vertex(x=x, basis=list(kept.keys), steps=steps)


def _largest_residual(a_matrix: np.ndarray, basis: list[int]) -> int:
    """The key whose column is farthest from the span of the basis columns."""
    if not basis:
        return int(np.argmax(np.linalg.norm(a_matrix, axis=0)))
    q_factor, _ = np.linalg.qr(a_matrix[:, basis])
    residual = a_matrix - q_factor @ (q_factor.T @ a_matrix)
    norms = np.linalg.norm(residual, axis=0)
    norms[basis] = -1
    return int(np.argmax(norms))


def complete_basis(a_matrix: np.ndarray, vertex: Vertex) -> Vertex:
    """Add zero-weight keys, in key order, until the basis has ``r`` independent columns (then,
    should the dependence test have refused too many nearly dependent ones, the columns farthest
    from the basis' span)."""
    r, m = a_matrix.shape
    basis = list(vertex.basis)
    for key in range(m):
        if len(basis) == r:
            break
        if key in basis:
            continue
        if not basis or not _coefficients(a_matrix[:, basis], a_matrix[:, key])[1]:
            basis.append(key)
    while len(basis) < r:
        basis.append(_largest_residual(a_matrix, basis))
    return Vertex(x=vertex.x, basis=basis, steps=vertex.steps, optimal=vertex.optimal)


def independent_rows(a_matrix: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same constraints ``A x = b`` with linearly independent rows (``b`` in ``A``'s range):
    a few keys' columns may span less than the whole space."""
    left, singular, _ = np.linalg.svd(a_matrix, full_matrices=False)
    keep = singular > DEPENDENCE_RTOL * max(float(singular[:1].max(initial=0)), 1e-300)
    if int(keep.sum()) == a_matrix.shape[0]:
        return a_matrix, b
    return left[:, keep].T @ a_matrix, left[:, keep].T @ b


def _entering(reduced: np.ndarray, threshold: float, bland: bool) -> int | None:
    improving = np.flatnonzero(reduced > threshold)
    if not improving.size:
        return None
    if bland:
        return int(improving[0])
    return int(improving[np.argmax(reduced[improving])])


def _leaving(basis: list[int], x_basic: np.ndarray, w: np.ndarray) -> tuple[float, int]:
    """Ratio test: the step and the basis position that leaves (smallest key among ties)."""
    rising = w > PIVOT_TOL
    ratios = np.full(len(w), np.inf)
    ratios[rising] = np.maximum(x_basic[rising], 0) / w[rising]
    t = float(ratios.min())
    ties = np.flatnonzero(ratios <= t + ZERO_TOL / max(float(w[rising].max()), 1.0))
    position = min(ties.tolist(), key=lambda i: basis[i])
    return t, position


def basic_solution(a_matrix: np.ndarray, b: np.ndarray, basis: list[int], m: int) -> np.ndarray:
    """The point of the basis, recomputed from ``b`` (no drift from the pivots), zero below
    :data:`ZERO_TOL`."""
    x = np.zeros(m)
    x[basis] = np.linalg.solve(a_matrix[:, basis], b)
    x[x <= ZERO_TOL] = 0
    return x


def simplex(a_matrix: np.ndarray, b: np.ndarray, objective: np.ndarray, start: Vertex) -> Vertex:
    """Maximize ``objective . x`` over ``P`` from the vertex ``start`` (its basis complete).

    Args:
        a_matrix: ``(r, m)``; b: ``(r,)``; objective: ``(m,)``.
        start: a vertex with ``r`` basis keys (see :func:`complete_basis`).

    Returns:
        The optimal vertex (``optimal=False`` if the pivot limit was reached first).
    """
    m = a_matrix.shape[1]
    basis, x = list(start.basis), start.x.copy()
    threshold = COST_RTOL * max(float(np.abs(objective).max()), 1e-300)
    bland, pivots = False, 0
    while pivots < PIVOTS_PER_KEY * m:
        columns = a_matrix[:, basis]
        prices = np.linalg.solve(columns.T, objective[basis])
        reduced = objective - prices @ a_matrix
        reduced[basis] = 0
        entering = _entering(reduced, threshold, bland)
        if entering is None:
            return Vertex(basic_solution(a_matrix, b, basis, m), basis, start.steps + pivots)
        w = np.linalg.solve(columns, a_matrix[:, entering])
        if not (w > PIVOT_TOL).any():
            # P is bounded: only rounding made the cost look improving.
            return Vertex(basic_solution(a_matrix, b, basis, m), basis, start.steps + pivots)
        t, position = _leaving(basis, x[basis], w)
        x[basis] -= t * w
        x[entering], x[basis[position]] = t, 0.0
        basis[position] = entering
        bland = t <= ZERO_TOL
        pivots += 1
    x = basic_solution(a_matrix, b, basis, m)
    return Vertex(x, basis, start.steps + pivots, optimal=False)
