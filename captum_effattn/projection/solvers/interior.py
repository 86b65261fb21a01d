"""Primal-dual interior-point phase (Mehrotra predictor-corrector) with an exact crossover.

Semismooth Newton stalls on degenerate rows, where the optimum has fewer non-zeros than the basis
has columns and the dual maximizer is not unique (seen on layer-0 rows of MiniLM, whose repeated
tokens give near-duplicate value vectors), and is slow when the support must shrink a lot. The
interior-point method is indifferent to both: it needs 10-40 iterations whatever the row. Its
iterate stays strictly positive, so a crossover finishes the job: take the support where the
primal variable dominates its multiplier, and solve the equality constraints on that support
exactly (minimum-norm least squares), which is the optimum when the support is right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captum_effattn.projection.engine.grouped import GroupedProducts

FRACTION_TO_BOUNDARY = 0.995
# Keeps the normal matrix factorable when some weights x / (x + z) underflow near the optimum.
RIDGE = 1e-14
CROSSOVER_ROUNDS = 4
# The duality measure must reach ``tol * GAP_FRACTION``; the phase stops there in any case.
GAP_FRACTION = 1e-8


@dataclass(frozen=True)
class _NewtonSystem:
    """The reduced KKT system of one interior-point iteration (normal equations in theta)."""

    ops: GroupedProducts
    factor: torch.Tensor  # Cholesky factor of B^T W B (+ identity on dead columns)
    weight: torch.Tensor  # W = x / (x + z)
    x: torch.Tensor
    z: torch.Tensor
    mask: torch.Tensor
    dual_residual: torch.Tensor  # x - B theta - z
    primal_residual: torch.Tensor  # B^T x - c

    def direction(self, complementarity: torch.Tensor):
        """Solve for ``(dx, dz, dtheta)`` with right-hand side ``complementarity`` for ``x z``."""
        shifted = self.dual_residual + complementarity / self.x
        rhs = self.ops.right(self.weight * shifted) - self.primal_residual
        d_theta = torch.cholesky_solve(rhs[..., None], self.factor)[..., 0]
        d_x = self.weight * (self.ops.left(d_theta) - shifted)
        d_z = -(complementarity + self.z * d_x) / self.x * self.mask
        return d_x, d_z, d_theta


def _max_step(value: torch.Tensor, change: torch.Tensor, fraction: float) -> torch.Tensor:
    ratio = torch.where(
        change < 0, -value / change.clamp_max(-torch.finfo(value.dtype).tiny), torch.inf
    )
    return (fraction * ratio.amin(-1)).clamp_max(1.0)


def _pseudo_solve(matrix: torch.Tensor, rhs: torch.Tensor, rtol: float = 1e-15) -> torch.Tensor:
    """``pinv(matrix) @ rhs`` for symmetric PSD matrices ``(R, r, r)`` and ``rhs`` ``(R, r)``."""
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    keep = eigenvalues > rtol * eigenvalues[:, -1:].clamp_min(torch.finfo(matrix.dtype).tiny)
    inverse = torch.where(keep, 1 / torch.where(keep, eigenvalues, 1), 0)
    coords = (vectors.mT @ rhs[..., None])[..., 0] * inverse
    return (vectors @ coords[..., None])[..., 0]


def crossover(
    basis: GroupedProducts, c: torch.Tensor, x: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """Exact solution on the support ``x > z`` identified by the interior point, where valid.

    Returns ``x`` refined on its support (exact zeros elsewhere) for rows where that refinement is
    non-negative and satisfies the constraints at least as well; the interior iterate otherwise.
    """
    before = (c - basis.right(x)).norm(dim=-1)
    best = x
    support = (x > z).to(x.dtype)
    for _ in range(CROSSOVER_ROUNDS):
        gram = basis.gram(support)
        refined = x * support
        for _ in range(2):  # one step solves it; the second is iterative refinement
            residual = c - basis.right(refined)
            refined = refined + support * basis.left(_pseudo_solve(gram, residual))
        after = (c - basis.right(refined)).norm(dim=-1)
        valid = (refined.amin(-1) >= 0) & (after <= before.clamp_min(1e-15))
        best = torch.where(valid[:, None], refined, best)
        # Without strict complementarity x and z both vanish on some keys and the split can put
        # a zero of the optimum into the support, where the exact solve turns it negative: drop
        # those keys and solve again.
        negative = refined < 0
        if not negative.any():
            break
        support = support * ~negative
    return best


def interior_point_phase(
    basis: GroupedProducts,
    c: torch.Tensor,
    row_mask: torch.Tensor,
    dead_columns: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``min ||x||^2 s.t. x >= 0, B^T x = c`` for each row, then cross over.

    Args:
        basis: per-row orthonormal bases.
        c: ``(R, r)`` right-hand sides ``B^T a``.
        row_mask: ``(R, n)`` the keys each row may use.
        dead_columns: ``(R, r)`` basis columns that are zero for the row (rank below ``r``).
        max_iter: iterations at most.
        tol: tolerance on the primal and dual residuals; the duality measure must reach
            ``tol * GAP_FRACTION``, where every row stops.

    Returns:
        ``(x, iterations, converged)``, each per row.
    """
    R, r = c.shape
    mask = row_mask.to(c.dtype)
    n_real = mask.sum(-1, keepdim=True)
    # Start from the centre of the simplex: well inside the orthant and already summing to one.
    x = mask / n_real + (1 - mask)
    z = x.clone()
    theta = torch.zeros_like(c)
    eye = torch.eye(r, dtype=c.dtype, device=c.device)
    iterations = torch.zeros(R, dtype=torch.long, device=c.device)
    converged = torch.zeros(R, dtype=torch.bool, device=c.device)
    # Unfinished rows are kept compact and written back when they finish (as in newton_phase).
    active = torch.arange(R, device=c.device)
    ops = basis
    xa, za, theta_a, ma, ca = x.clone(), z.clone(), theta, mask, c
    n_a, dead_a = n_real[:, 0], torch.diag_embed(dead_columns.to(c.dtype))
    for step_count in range(max_iter + 1):
        dual_residual = (xa - ops.left(theta_a) - za) * ma
        primal_residual = ops.right(xa * ma) - ca
        gap = (xa * za * ma).sum(-1) / n_a
        small_gap = gap <= tol * GAP_FRACTION
        solved = (
            small_gap & (primal_residual.norm(dim=-1) <= tol) & (dual_residual.norm(dim=-1) <= tol)
        )
        # Past this gap the support is settled and further steps only drive x and z towards
        # underflow, where the iterate breaks down (near-one-hot rows stall at a primal residual
        # of a few 1e-12): stop there, solved or not, and let the crossover finish the row.
        done = small_gap | ~torch.isfinite(gap)
        if done.all() or step_count == max_iter:
            converged[active] = solved
            break
        if done.any():
            finished, keep = active[done], ~done
            x[finished], z[finished], converged[finished] = xa[done], za[done], solved[done]
            iterations[finished] = step_count
            active = active[keep]
            xa, za, theta_a, ma, ca = xa[keep], za[keep], theta_a[keep], ma[keep], ca[keep]
            n_a, dead_a = n_a[keep], dead_a[keep]
            dual_residual, primal_residual, gap = (
                dual_residual[keep],
                primal_residual[keep],
                gap[keep],
            )
            ops = ops.subset(keep)
        weight = xa / (xa + za) * ma
        factor, _ = torch.linalg.cholesky_ex(ops.gram(weight) + dead_a + RIDGE * eye)
        system = _NewtonSystem(ops, factor, weight, xa, za, ma, dual_residual, primal_residual)
        # Predictor (affine scaling), then Mehrotra's centring-corrector with the same factor.
        d_x, d_z, d_theta = system.direction(xa * za * ma)
        affine = torch.minimum(_max_step(xa, d_x, 1.0), _max_step(za, d_z, 1.0))[:, None]
        gap_affine = ((xa + affine * d_x) * (za + affine * d_z) * ma).sum(-1) / n_a
        centring = (gap_affine / gap).clamp(0, 1) ** 3
        d_x, d_z, d_theta = system.direction((xa * za + d_x * d_z - (centring * gap)[:, None]) * ma)
        step = torch.minimum(
            _max_step(xa, d_x, FRACTION_TO_BOUNDARY), _max_step(za, d_z, FRACTION_TO_BOUNDARY)
        )[:, None]
        xa = xa + step * d_x
        za = za + step * d_z
        theta_a = theta_a + step * d_theta
    x[active], z[active], iterations[active] = xa, za, step_count
    x = x * mask
    return crossover(basis, c, x, z * mask), iterations, converged
