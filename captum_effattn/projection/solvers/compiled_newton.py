"""The semismooth Newton phase of :mod:`.newton`, compiled row by row with numba (CPU).

Same iteration, same constants: Newton steps on the dual ``max theta^T c - 1/2 ||relu(B theta)||^2``
with the Levenberg-Marquardt-regularized support Gram matrix and the exact line search. Batched
PyTorch runs every step as some forty small tensor operations over all unfinished rows, and on a CPU
those are bound by per-operation latency, not by their arithmetic. Compiled, a row costs its
arithmetic only, and two things batching cannot do become cheap: the support's Gram matrix is
updated from just the keys that entered or left it, and each row stops the moment it converges.
Rows are shared among as many threads as the caller allows PyTorch
(:func:`..engine.threads.allowed_threads`), in small blocks (a few rows need ten times the median
number of steps, and they come together: near-one-hot rows of one head): on numba's own thread
pool where its threading layer is OpenMP or TBB, each of its threads claiming the next block as
it becomes free (``newton_kernels.claim_block``, an atomic counter), otherwise on Python threads
that take the next block as they become free (the kernels release the GIL).
Numba's pool matters on a busy machine: right after a forward pass PyTorch's OpenMP threads still
spin for a few milliseconds, and Python threads that must wake up and take the GIL for every block
lose the cores to them (72 [CLS] rows on two threads: 11 ms after a forward on Python threads,
6.8 ms on numba's pool, 12 ms on one thread).

Needs ``numba`` (``pip install captum-effattn[numba]``); :func:`numba_available` says whether it is
importable. The first call compiles (cached on disk afterwards).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import NamedTuple

import numpy as np
import torch

from captum_effattn.projection.basis import MAX_INVERSE_NORM
from captum_effattn.projection.engine.threads import allowed_threads
from captum_effattn.projection.solvers.newton import (
    MAX_STEP,
    REGULARIZATION,
    REGULARIZATION_FLOOR,
    NewtonResult,
)

# Rows per block handed to a thread at least. One: the 72 [CLS] rows of MiniLM (one head each,
# so no geometry is shared within a block) balance better one by one on numba's pool, where a
# block costs no hand-off: their projection took 0.945x the time of blocks of four on two threads
# (n = 128, 30 interleaved rounds; 0.973x at batch 8).
BLOCK_ROWS = 1
# The same on Python threads (numba's pool unusable, as in a forked child), where each block is a
# hand-off of tens of microseconds under the GIL.
PYTHON_BLOCK_ROWS = 4
# Blocks per thread at most: thousands of rows (``query="all"``) go in larger blocks, since each
# costs its first group's geometry again (and, on Python threads, a hand-off of tens of
# microseconds under the GIL). Every row of MiniLM's 72 heads at n = 256, two threads: 1.13-1.16 s
# with 64, 1.21-1.26 s with 16 (two runs of 5 interleaved rounds: fewer, larger blocks balance
# one head's slow rows worse).
BLOCKS_PER_THREAD = 64


class ValueNewtonRows(NamedTuple):
    """What :func:`compiled_value_newton` returns, per row."""

    x: torch.Tensor  # (R, n) float64 efficient rows (normalized); zero where not solved
    iterations: torch.Tensor  # (R,) int64 Newton steps taken
    solved: torch.Tensor  # (R,) bool: converged here (the others go to the general path)
    output_error: torch.Tensor  # (R,) float64 relative head-output error of solved rows


ValueNewton = Callable[..., ValueNewtonRows]
"""The signature of :func:`compiled_value_newton`."""

ValueProjection = Callable[..., ValueNewtonRows]
"""The signature of :func:`compiled_value_projection`."""


def _settings(max_iter: int, tol: float) -> tuple[int, float, float, float, float]:
    """The kernels' ``settings`` tuple (see ``newton_kernels.newton_rows``), from the PyTorch
    phase's constants: the one place its order and types are written."""
    return (int(max_iter), float(tol), REGULARIZATION, REGULARIZATION_FLOOR, MAX_STEP)


@cache
def numba_available() -> bool:
    """Whether ``numba`` can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("numba") is not None


@cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    # Keyed by process: a forked child inherits the executor but not its threads.
    del pid
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="captum_effattn_newton")


_PROBE_LOCK = threading.Lock()
_numba_pool_state: tuple[int, bool] | None = None  # (pid that started numba's pool, usable)


def _numba_pool_usable() -> bool:
    """Whether the rows may go to numba's thread pool (``prange``).

    Only with the OpenMP or TBB threading layer, and in the process that started it: numba's
    fallback layer (workqueue) aborts the process when two threads launch parallel work at once, as
    the attribution pipeline's caller and worker may, and GNU OpenMP does not survive a fork. The
    first call starts the pool (under a lock) to learn which layer numba picked.
    """
    global _numba_pool_state
    with _PROBE_LOCK:
        if _numba_pool_state is None:
            import numba

            # The kernel the common route runs (compiled once, the same types as its real calls).
            no_rows, no_ints = np.zeros((0, 1)), np.zeros(0, dtype=np.int64)
            _kernels().value_newton_blocks(
                np.zeros((1, 1, 1), dtype=np.float32),
                np.zeros((1, 1), dtype=np.bool_),
                no_ints,
                no_ints,
                no_rows,
                _settings(1, 1e-13),
                MAX_INVERSE_NORM,
                no_rows.copy(),
                np.zeros(0),
                no_ints.copy(),
                np.zeros(0, dtype=np.bool_),
                False,
                1,
                1,
            )
            _numba_pool_state = (os.getpid(), numba.threading_layer() in ("omp", "tbb"))
        pid, usable = _numba_pool_state
    return usable and pid == os.getpid()


@contextmanager
def _numba_threads(workers: int) -> Iterator[None]:
    """Numba's parallel regions on ``workers`` threads, in chunks of one index (both settings are
    the calling thread's own, and are restored on exit). The drivers' ``prange`` has one index a
    thread, and each claims blocks of rows until none is left: on the OpenMP layer the chunk size
    alone did not make blocks go to whichever thread is free."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(workers)
    try:
        with numba.parallel_chunksize(1):
            yield
    finally:
        numba.set_num_threads(before)


@cache
def _kernels():
    """The compiled per-row solvers (compiled on first use, then loaded from numba's disk cache)."""
    from captum_effattn.projection.solvers import newton_kernels

    return newton_kernels


def _numpy(tensor: torch.Tensor, dtype=np.float64) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)


def _in_blocks(
    solve: Callable[[slice], None], solve_blocks: Callable[[int, int], None], rows: int
) -> None:
    """All ``rows`` on the threads the caller allows PyTorch: ``solve(slice)`` solves a slice on
    the calling thread (or on a Python thread), ``solve_blocks(size, threads)`` all rows in
    blocks of ``size`` on ``threads`` threads of numba's pool."""
    threads = allowed_threads()
    numba_pool = min(threads, -(-rows // BLOCK_ROWS)) > 1 and _numba_pool_usable()
    smallest = BLOCK_ROWS if numba_pool else PYTHON_BLOCK_ROWS
    workers = min(threads, -(-rows // smallest))
    if numba_pool:
        import numba

        workers = min(workers, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if workers <= 1:
        solve(slice(None))
        return
    size = max(smallest, -(-rows // (workers * BLOCKS_PER_THREAD)))
    if numba_pool:
        with _numba_threads(workers):
            solve_blocks(size, workers)
        return
    blocks = [slice(i, i + size) for i in range(0, rows, size)]
    for _ in _pool(workers, os.getpid()).map(solve, blocks):
        pass  # re-raises a block's exception here


def compiled_newton_phase(
    ops,
    c: torch.Tensor,
    theta: torch.Tensor,
    max_iter: int,
    tol: float,
) -> NewtonResult:
    """:func:`captum_effattn.projection.solvers.newton.newton_phase` for CPU tensors, compiled.

    Args:
        ops: the rows' bases (:class:`..engine.grouped.GroupedMatrices`: ``matrices`` ``(G, n, r)``
            orthonormal, zero rows on masked keys; ``group`` ``(R,)``).
        c: ``(R, r)`` the rows' coordinates ``B^T a``.
        theta: ``(R, r)`` starting dual points (not modified).
        max_iter, tol: as in :func:`captum_effattn.projection.solvers.newton.newton_phase`.

    Returns:
        ``(theta, iterations, converged)``, each per row.
    """
    newton_rows = _kernels().newton_rows
    bases_np, c_np, group_np = _numpy(ops.matrices), _numpy(c), _numpy(ops.group, np.int64)
    theta_np = np.array(theta.detach().cpu().numpy(), dtype=np.float64, order="C", copy=True)
    iterations = np.zeros(len(c_np), dtype=np.int64)
    converged = np.zeros(len(c_np), dtype=np.bool_)

    settings = _settings(max_iter, tol)

    def solve(rows: slice) -> None:
        newton_rows(
            bases_np,
            group_np[rows],
            c_np[rows],
            theta_np[rows],
            settings,
            iterations[rows],
            converged[rows],
        )

    def solve_blocks(size: int, threads: int) -> None:
        _kernels().newton_blocks(
            bases_np, group_np, c_np, theta_np, settings, iterations, converged, size, threads
        )

    _in_blocks(solve, solve_blocks, len(c_np))
    return (
        torch.from_numpy(theta_np),
        torch.from_numpy(iterations),
        torch.from_numpy(converged),
    )


def _values_array(values: torch.Tensor) -> np.ndarray:
    """``values`` for the kernels as float32 or float64, without a copy where it already is one
    of them and contiguous (half precision widens to float32, exactly)."""
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    return _numpy(values, dtype=None)


def compiled_value_newton(
    values: torch.Tensor,
    key_mask: torch.Tensor,
    source: torch.Tensor,
    rows: torch.Tensor,
    max_iter: int,
    tol: float,
    prefix: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> ValueNewtonRows:
    """Efficient-attention rows by compiled Newton in the coordinates of ``[1, V]`` itself.

    The same steps as :func:`compiled_newton_phase` on an orthonormal basis of the same space,
    without building one (see ``newton_kernels.value_newton_rows``): the batched QR that basis
    costs is a third of a [CLS]-row projection. The values are read as given (float32 or float64:
    no float64 copy), each row is normalized on its usable keys, and each solved row's head-output
    error is measured in the same pass. Rows whose ``[1, V]`` is not well conditioned, or has no
    more columns than usable keys, or that do not converge within ``max_iter``, come back
    unsolved for the general path.

    Args:
        values: ``(S, n, d)`` value vectors (any floating dtype); key_mask: ``(S, n)`` real keys.
        source: ``(R,)`` the values of each row.
        rows: ``(R, n)`` attention rows, distributions over their usable keys (float64).
        max_iter, tol: as in :func:`compiled_newton_phase`.
        prefix: ``(R,)`` a row may use the real keys ``j < prefix`` only (causal rows); default:
            every real key.
        out: ``(R, n)`` contiguous float64 CPU tensor of zeros to write the rows into (returned
            as ``x``); default: a new one.

    Returns:
        :class:`ValueNewtonRows`.
    """
    return _value_rows(values, key_mask, source, rows, _settings(max_iter, tol), False, prefix, out)


def compiled_value_projection(
    values: torch.Tensor,
    key_mask: torch.Tensor,
    source: torch.Tensor,
    rows: torch.Tensor,
    prefix: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> ValueNewtonRows:
    """Effective-attention rows, compiled: each row projected orthogonally onto the span of its
    values' columns, ``W G^{-1} W^T a`` with ``W`` the unit columns of ``V`` on the usable keys
    (the geometry of :func:`compiled_value_newton` without its column of ones, and no step).

    The values are read as given, the rows as given (not normalized: the projection is linear),
    and each row's head-output error is measured in the same pass. Rows whose ``V`` is not well
    conditioned or has no more columns than usable keys come back unprojected for the general
    path (``solved`` False), as the normal equations of ``effective_attention`` leave them.

    Args:
        values, key_mask, source, prefix, out: as in :func:`compiled_value_newton`.
        rows: ``(R, n)`` float64 attention rows (entries on keys a row may not use are ignored).

    Returns:
        :class:`ValueNewtonRows` (no steps: ``iterations`` is zero).
    """
    return _value_rows(values, key_mask, source, rows, _settings(0, 0.0), True, prefix, out)


def _value_rows(
    values: torch.Tensor,
    key_mask: torch.Tensor,
    source: torch.Tensor,
    rows: torch.Tensor,
    settings: tuple[int, float, float, float, float],
    project_only: bool,
    prefix: torch.Tensor | None,
    out: torch.Tensor | None,
) -> ValueNewtonRows:
    """``newton_kernels.value_newton_rows`` over every row, on the caller's threads."""
    kernel = _kernels().value_newton_rows
    values_np, mask_np = _values_array(values), _numpy(key_mask, np.bool_)
    rows_np, source_np = _numpy(rows), _numpy(source, np.int64)
    if prefix is None:
        prefix_np = np.full(len(rows_np), rows_np.shape[-1], dtype=np.int64)
    else:
        prefix_np = _numpy(prefix, np.int64)
    if out is None:
        x = np.zeros_like(rows_np)
    elif (
        out.dtype != torch.float64
        or out.shape != rows.shape
        or not out.is_contiguous()
        or out.device.type != "cpu"
    ):
        raise ValueError(
            f"out must be a contiguous float64 CPU tensor of shape {tuple(rows.shape)}; got "
            f"{'a contiguous' if out.is_contiguous() else 'a non-contiguous'} {out.dtype} tensor "
            f"of shape {tuple(out.shape)} on {out.device}"
        )
    else:
        x = out.numpy()
    error = np.zeros(len(rows_np))
    iterations = np.zeros(len(rows_np), dtype=np.int64)
    solved = np.zeros(len(rows_np), dtype=np.bool_)
    per_row = (x, error, iterations, solved)

    def solve(block: slice) -> None:
        kernel(
            values_np,
            mask_np,
            source_np[block],
            prefix_np[block],
            rows_np[block],
            settings,
            MAX_INVERSE_NORM,
            *(array[block] for array in per_row),
            project_only,
        )

    def solve_blocks(size: int, threads: int) -> None:
        _kernels().value_newton_blocks(
            values_np,
            mask_np,
            source_np,
            prefix_np,
            rows_np,
            settings,
            MAX_INVERSE_NORM,
            *per_row,
            project_only,
            size,
            threads,
        )

    _in_blocks(solve, solve_blocks, len(rows_np))
    rows_out = out if out is not None else torch.from_numpy(x)
    return ValueNewtonRows(rows_out, *(torch.from_numpy(a) for a in (iterations, solved, error)))
