"""Semismooth Newton on the dual of the efficient-attention QP, with an exact line search.

For one row with orthonormal basis ``B`` of ``span([V, 1])`` and ``c = B^T a`` the problem

    minimize ||x||^2  subject to  x >= 0,  B^T x = c

has the concave, piecewise-quadratic dual ``max_theta  theta^T c - 1/2 ||relu(B theta)||^2`` whose
maximizer gives ``x = relu(B theta)`` (see "a useful dual" on the method page of the documentation,
docs/method.md). Newton steps solve the linear system of the current support; the step length
maximizes the dual exactly along the direction, up to the full Newton step (the derivative is
monotone and piecewise linear, so its root is found by sorting the breakpoints). This converges
in a handful of steps on most rows; rows that stall (degenerate duals, long active-set changes)
are handed to the interior-point phase.
"""

from __future__ import annotations

import math

import torch

from captum_effattn.projection.engine.grouped import GroupedProducts, gram_change

# Levenberg-Marquardt-style regularization of the (possibly singular) generalized Hessian:
# mu = REGULARIZATION * ||gradient|| + FLOOR. Small enough for superlinear convergence, large
# enough to keep steps finite on supports that do not span the basis. 3e-2 takes the fewest steps
# with MAX_STEP (with the line search unbounded, 1e-2 did).
REGULARIZATION = 3e-2
REGULARIZATION_FLOOR = 1e-14
# The line search stops at the full Newton step, as backtracking from it would. Past it (phi keeps
# rising there when keys leave the support along the line) one step dropped 15-45 keys of a
# vertex row, which then came back one per step: on MiniLM's [CLS] rows at n = 128 the mean went
# from 19.3 steps to 16.3 with both settings, the most on one row from 122 to 69.
MAX_STEP = 1.0
# The support's Gram matrix is updated from the keys that entered or left it while they are fewer
# than this fraction of all entries, and recomputed otherwise (the first steps move many keys).
INCREMENTAL_GRAM_FRACTION = 1 / 64


# After the first two Newton steps the line search looks for the step among the nearest
# breakpoints only (a partial sort): from then on the maximizer lies within the first few segments
# (on MiniLM rows of 256 keys: 3-7 on average, at most 60), and a full sort of every row took a
# third of the solve. The first steps cross many breakpoints (65 on average), so they sort all.
NewtonResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(theta, iterations, converged)``, each per row."""

CANDIDATE_BREAKS = 32
FULL_SORT_STEPS = 2


def _step_on_segments(
    breaks: torch.Tensor,
    order: torch.Tensor,
    slope_terms: torch.Tensor,
    curvature_terms: torch.Tensor,
    alpha0: torch.Tensor,
    beta0: torch.Tensor,
    slope0: torch.Tensor,
    *,
    complete: torch.Tensor,
    max_step: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The maximizing step in ``[0, max_step]`` over the segments between ``breaks``
    (ascending), and whether it was found: on the given segments, past the last breakpoint when
    ``complete`` (no other), or at ``max_step`` when the given segments reach it."""
    alpha = torch.cat([alpha0, alpha0 + torch.gather(slope_terms, -1, order).cumsum(-1)], -1)
    beta = torch.cat([beta0, beta0 + torch.gather(curvature_terms, -1, order).cumsum(-1)], -1)
    slope0 = slope0[:, None]
    # phi' at each breakpoint, from the segment on its left.
    at_break = slope0 - alpha[:, :-1] - beta[:, :-1] * breaks
    crossed = at_break <= 0
    # phi is concave: past max_step, the maximizer on [0, max_step] is max_step itself.
    found = crossed.any(-1) | complete | (breaks[:, -1] >= max_step)
    # Without a crossing the last segment holds the maximizer (unbounded when complete).
    crossed = torch.cat([crossed, torch.ones_like(crossed[:, :1])], -1)
    segment = crossed.to(torch.int8).argmax(-1, keepdim=True)
    a, b = alpha.gather(-1, segment), beta.gather(-1, segment)
    step = ((slope0 - a) / b.clamp_min(torch.finfo(breaks.dtype).tiny))[:, 0]
    return step.clamp(0, max_step), found


def exact_step(
    u: torch.Tensor,
    w: torch.Tensor,
    slope0: torch.Tensor,
    candidates: int | None = None,
    max_step: float = math.inf,
) -> torch.Tensor:
    """Step ``0 <= t <= max_step`` maximizing ``phi(t) = t s - 1/2 ||relu(u + t w)||^2`` for each
    row.

    ``phi'(t) = s - sum_i w_i relu(u_i + t w_i)`` is non-increasing and linear between the
    breakpoints ``t_i = -u_i / w_i``; sweep them in order, tracking the active sums, and solve on
    the segment where ``phi'`` changes sign.

    Args:
        u: ``(R, n)`` current ``B theta``.
        w: ``(R, n)`` direction ``B d``.
        slope0: ``(R,)`` the constant ``s = d^T c``.
        candidates: sweep only this many nearest breakpoints first; rows whose sign change lies
            beyond them, below ``max_step``, then sort all of theirs (unless ``phi'`` is still
            not negative at a finite ``max_step``: their step is ``max_step``). ``None``: sort
            all at once.
        max_step: the longest step (the maximizer beyond it is cut to it).
    """
    breaks, terms = _breakpoints(u, w, slope0)
    if candidates is None or candidates >= u.shape[-1]:
        return sorted_step(breaks, terms, max_step)
    nearest, order = torch.topk(breaks, candidates, dim=-1, largest=False, sorted=True)
    complete = torch.isinf(nearest[:, -1])  # every breakpoint of the row is among them
    step, found = _step_on_segments(nearest, order, *terms, complete=complete, max_step=max_step)
    if not bool(found.all()):
        rest = (~found).nonzero()[:, 0]
        if math.isfinite(max_step):
            # phi' still not negative at max_step: phi rises all the way, no sort needed.
            at_bound = (w[rest] * (u[rest] + max_step * w[rest]).clamp_min(0)).sum(-1)
            full = slope0[rest] - at_bound >= 0
            step[rest[full]] = max_step
            rest = rest[~full]
        if len(rest):
            step[rest] = sorted_step(breaks[rest], tuple(term[rest] for term in terms), max_step)
    return step


def _breakpoints(
    u: torch.Tensor, w: torch.Tensor, slope0: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Each key's breakpoint ``-u_i / w_i`` (``inf`` for keys that never cross 0), and per row
    what each breakpoint adds to ``phi``'s slope and curvature with their values at ``t = 0``."""
    active0 = (u > 0) | ((u == 0) & (w > 0))
    alpha0 = (active0 * w * u).sum(-1, keepdim=True)
    beta0 = (active0 * w * w).sum(-1, keepdim=True)
    enters = (w > 0) & (u < 0)
    leaves = (w < 0) & (u > 0)
    moving = enters | leaves
    safe_w = torch.where(moving, w, torch.ones_like(w))
    breaks = torch.where(moving, -u / safe_w, torch.full_like(u, torch.inf))
    sign = enters.to(u.dtype) - leaves.to(u.dtype)
    return breaks, (sign * w * u, sign * w * w, alpha0, beta0, slope0)


def sorted_step(
    breaks: torch.Tensor, terms: tuple[torch.Tensor, ...], max_step: float = math.inf
) -> torch.Tensor:
    """The exact step in ``[0, max_step]`` from every breakpoint sorted: no value read back to the
    host, so it can run inside a CUDA graph."""
    ordered, order = torch.sort(breaks, dim=-1)
    complete = torch.ones(breaks.shape[0], dtype=torch.bool, device=breaks.device)
    step, _ = _step_on_segments(ordered, order, *terms, complete=complete, max_step=max_step)
    return step


def _support_gram(
    ops: GroupedProducts,
    previous: tuple[torch.Tensor, torch.Tensor] | None,
    support: torch.Tensor,
) -> torch.Tensor:
    """``B^T diag(support) B`` per row: updated from the previous support's Gram matrix when
    few keys moved, computed afresh otherwise."""
    if previous is not None:
        old, gram = previous
        moved = int((support != old).sum())
        if moved < INCREMENTAL_GRAM_FRACTION * support.numel():
            return gram + gram_change(ops.matrices, ops.group, old, support)
    return ops.gram(support)


def dual_gradient(
    ops: GroupedProducts, c: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, gradient, norm)`` per row: ``u = B theta``, the dual gradient ``c - B^T relu(u)``
    and its norm."""
    u = ops.left(theta)
    gradient = c - ops.right(u.clamp_min(0))
    return u, gradient, gradient.norm(dim=-1)


def newton_direction(
    gram: torch.Tensor, gradient: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """The Newton direction ``(gram + mu I)^{-1} gradient`` per row, with the Levenberg-Marquardt
    term ``mu = REGULARIZATION * ||gradient|| + REGULARIZATION_FLOOR``.

    No error check (nothing is read back): a row whose factorization fails gets a non-finite
    direction, never converges, and goes to the interior point like any row Newton leaves
    unfinished.
    """
    mu = REGULARIZATION * norm + REGULARIZATION_FLOOR
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, _ = torch.linalg.cholesky_ex(gram + mu[:, None, None] * eye)
    return torch.cholesky_solve(gradient[..., None], factor)[..., 0]


def newton_phase(
    basis: GroupedProducts,
    c: torch.Tensor,
    theta: torch.Tensor,
    max_iter: int,
    tol: float,
) -> NewtonResult:
    """Run semismooth Newton steps until ``||c - B^T relu(B theta)|| <= tol`` or ``max_iter``.

    Args:
        basis: per-row orthonormal bases (``(n, r)`` per group).
        c: ``(R, r)`` the row's coordinates ``B^T a``.
        theta: ``(R, r)`` starting dual point.
        max_iter: steps at most.
        tol: absolute tolerance on the dual gradient (``B`` orthonormal, rows sum to 1).

    Returns:
        ``(theta, iterations, converged)``, each per row.
    """
    R = len(c)
    iterations = torch.zeros(R, dtype=torch.long, device=c.device)
    converged = torch.zeros(R, dtype=torch.bool, device=c.device)
    # The unfinished rows' state is kept compact and written back only when rows finish:
    # scattering into the full arrays every step cost more than the steps' arithmetic.
    active = torch.arange(R, device=c.device)
    ops, c_active, theta_active = basis, c, theta.clone()
    # The last support and its Gram matrix B^T diag(support) B.
    previous: tuple[torch.Tensor, torch.Tensor] | None = None
    for step_count in range(max_iter + 1):
        u, gradient, norm = dual_gradient(ops, c_active, theta_active)
        done = norm <= tol
        if step_count == max_iter or done.all():
            converged[active[done]] = True
            break
        if done.any():
            finished, keep = active[done], ~done
            theta[finished], converged[finished] = theta_active[done], True
            iterations[finished] = step_count
            active, u, gradient, norm = active[keep], u[keep], gradient[keep], norm[keep]
            c_active, theta_active = c_active[keep], theta_active[keep]
            if previous is not None:
                previous = (previous[0][keep], previous[1][keep])
            ops = ops.subset(keep)
        support = (u > 0).to(u.dtype)
        gram = _support_gram(ops, previous, support)
        previous = (support, gram)
        direction = newton_direction(gram, gradient, norm)
        candidates = CANDIDATE_BREAKS if step_count >= FULL_SORT_STEPS else None
        slope0 = (direction * c_active).sum(-1)
        step = exact_step(u, ops.left(direction), slope0, candidates, max_step=MAX_STEP)
        theta_active += step[:, None] * direction
    theta[active], iterations[active] = theta_active, step_count
    return theta, iterations, converged
