"""Independent reference solvers for the projections (numpy/scipy, one row at a time).

They share no code with the package: exhaustive KKT enumeration for tiny problems, a generic
SQP solver (scipy's SLSQP) for moderate ones, and least squares for effective attention.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.optimize
import torch


def constraint_matrix(values: np.ndarray) -> np.ndarray:
    """``E`` with rows ``1^T`` and ``V^T``: the constraints ``E x = E a``."""
    return np.vstack([np.ones(values.shape[0]), values.T])


def efficient_by_enumeration(a: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Exact minimum-norm point of ``{x >= 0, sum x = 1, x V = a V}`` for tiny ``n`` (<= 12).

    The optimum is the minimum-norm solution of the equality constraints restricted to its own
    support (non-negativity is inactive there), so it is among the candidates below, and every
    other feasible candidate has a larger norm.
    """
    n = len(a)
    E = constraint_matrix(values)
    c = E @ a
    best, best_norm = None, np.inf
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x_s = np.linalg.lstsq(E[:, cols], c, rcond=None)[0]
            if np.abs(E[:, cols] @ x_s - c).max() > 1e-10 or x_s.min() < -1e-12:
                continue
            x = np.zeros(n)
            x[cols] = np.clip(x_s, 0, None)
            if x @ x < best_norm - 1e-15:
                best, best_norm = x, x @ x
    return best


def efficient_by_slsqp(a: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Generic SQP solution (scipy SLSQP) of the same QP: the benchmarks' per-row reference."""
    E = constraint_matrix(values)
    c = E @ a
    result = scipy.optimize.minimize(
        lambda x: x @ x,
        a,
        jac=lambda x: 2 * x,
        method="SLSQP",
        bounds=[(0, None)] * len(a),
        constraints=[{"type": "eq", "fun": lambda x: E @ x - c, "jac": lambda x: E}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return np.clip(result.x, 0, None)


def effective_by_lstsq(a: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Minimum-norm solution of ``x V = a V``: the effective attention row."""
    return np.linalg.lstsq(values.T, values.T @ a, rcond=None)[0]


def materialized(query, key, key_mask, causal, scaling):
    """``softmax(Q K^T * scale + mask)`` for every row, in float64, heads repeated as repeat_kv."""
    heads, kv_heads, n = query.shape[-3], key.shape[-3], key.shape[-2]
    key = key.double().repeat_interleave(heads // kv_heads, dim=-3)
    scores = query.double() @ key.mT * scaling
    visible = torch.ones(query.shape[-2], n, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    if key_mask is not None:
        visible = visible & key_mask[..., None, None, :]
    return scores.masked_fill(~visible, -torch.inf).softmax(-1)
