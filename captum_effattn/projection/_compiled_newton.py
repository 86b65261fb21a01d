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
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch

from captum_effattn.projection._newton import REGULARIZATION, REGULARIZATION_FLOOR
from captum_effattn.projection._threads import allowed_threads

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
    """The compiled per-row solver (compiled on first use, then loaded from numba's disk cache)."""
    from captum_effattn.projection._newton_numba import newton_rows

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
