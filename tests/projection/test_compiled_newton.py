"""The compiled (numba) Newton phase: the same iteration as the batched PyTorch one, row by row."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_effattn import efficient_attention
from captum_effattn.kernels import KernelUnavailableError
from captum_effattn.projection.engine.backends import NumbaBackend, resolve_backend
from captum_effattn.projection.solvers.compiled_newton import (
    compiled_newton_phase,
    compiled_value_newton,
    numba_available,
)
from captum_effattn.projection.solvers.newton import exact_step, newton_phase
from tests.projection.problems import (
    attention_rows,
    dual_problem,
    grouped_problem_shapes,
    grouped_rows_problem,
    head_output_error,
    value_vectors,
)

pytestmark = pytest.mark.skipif(not numba_available(), reason="needs the numba extra")


@settings(max_examples=25, deadline=None)
@given(shape=grouped_problem_shapes())
def test_same_steps_as_the_batched_newton_phase(shape):
    """Same iteration: the same number of steps per row and the same dual point to rounding."""
    ops, c = dual_problem(*shape)
    theta, steps, converged = newton_phase(ops, c, c.clone(), 50, 1e-13)
    theta_c, steps_c, converged_c = compiled_newton_phase(ops, c, c.clone(), 50, 1e-13)
    assert torch.equal(converged_c, converged)
    # Rounding may move a borderline row's last step by one: the paths are not bit-identical.
    assert (steps_c - steps).abs().max() <= 1
    x, x_c = ops.left(theta).clamp_min(0), ops.left(theta_c).clamp_min(0)
    torch.testing.assert_close(x_c[converged], x[converged], atol=1e-11, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 80),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    max_step=st.sampled_from([math.inf, 1.0, 0.05]),
    seed=st.integers(0, 2**16),
)
def test_bracketed_line_search_finds_the_same_step(n, scale, max_step, seed):
    """Sorting only the breakpoints below the bracket (and below ``max_step``) gives the full
    sort's step."""
    from captum_effattn.projection.solvers.newton_kernels import exact_step as compiled_step

    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(8, n, generator=gen, dtype=torch.float64)
    u[:2, : n // 2] = 0  # keys exactly at the boundary
    w = torch.randn(8, n, generator=gen, dtype=torch.float64)
    w = w * (torch.rand(8, n, generator=gen) > 0.3)
    # A key the direction raises bounds phi from above, as for every Newton direction (the dual
    # is bounded because P(a) is not empty).
    w[:, -1] = w[:, -1].abs() + 0.1
    s = scale * torch.randn(8, generator=gen, dtype=torch.float64).abs()
    expected = exact_step(u, w, s, max_step=max_step)
    breaks, order = np.empty(n), np.empty(n, dtype=np.int64)
    for row in range(8):
        row_u, row_w = u[row].numpy(), w[row].numpy()
        step = compiled_step(row_u, row_w, float(s[row]), breaks, order, max_step)
        assert step == pytest.approx(float(expected[row]), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("crossed", [0, 3, 8, 9, 40, 120])
def test_line_search_past_many_breakpoints(crossed):
    """A step that crosses ``crossed`` breakpoints before the maximizer: the first few taken by
    selection, the rest from the in-place heap, as the full sort of the reference finds."""
    from captum_effattn.projection.solvers.newton_kernels import exact_step as compiled_step

    n = 120
    gen = torch.Generator().manual_seed(crossed)
    # Every key enters (u < 0 < w) at its own breakpoint t_i = -u_i / w_i, in shuffled order.
    w = 0.5 + torch.rand(1, n, generator=gen, dtype=torch.float64)
    t = torch.randperm(n, generator=gen).to(torch.float64)[None] + 1.0
    u = -t * w
    # phi'(t) = s - sum over entered keys of w_i (u_i + t w_i): put the root just past the
    # ``crossed``-th breakpoint.
    order = t[0].argsort()
    entered = order[:crossed]
    t_root = (float(t[0, order[crossed]]) if crossed < n else float(t.max()) + 1.0) - 0.5
    s = ((w[0, entered] * (u[0, entered] + t_root * w[0, entered])).sum()).reshape(1)
    expected = exact_step(u, w, s)
    assert float(expected[0]) == pytest.approx(t_root if crossed else 0.0, rel=1e-12, abs=1e-12)
    breaks, keys = np.empty(n), np.empty(n, dtype=np.int64)
    step = compiled_step(u[0].numpy(), w[0].numpy(), float(s[0]), breaks, keys, math.inf)
    assert step == pytest.approx(float(expected[0]), rel=1e-12, abs=1e-12)
    # Cut short before the root: phi' is still positive at the bound, which is the step, found
    # from the slope's sums alone (no breakpoint is computed: the buffer is not written).
    bound = 0.5 * float(expected[0])
    breaks[:] = np.nan
    step = compiled_step(u[0].numpy(), w[0].numpy(), float(s[0]), breaks, keys, bound)
    assert step == bound
    assert np.isnan(breaks).all()
    # A bound past the root: phi' is negative there, and the sweep finds the root.
    if crossed:
        bound = 1.5 * float(expected[0])
        step = compiled_step(u[0].numpy(), w[0].numpy(), float(s[0]), breaks, keys, bound)
        assert step == pytest.approx(float(expected[0]), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("r", [1, 2, 3, 4, 5, 7, 8, 33, 65])
def test_compiled_cholesky_solves_like_torch(r):
    """The compiled factorization of a shifted matrix (four rows at a time below the diagonal, the
    shift added as entries are read), the row-wise back substitution and the inverse's norm
    agree with torch, at every size modulo four."""
    from captum_effattn.projection.solvers.newton_kernels import (
        factored_solve,
        inverse_frobenius,
        lower_times,
        shifted_cholesky,
    )

    gen = torch.Generator().manual_seed(r)
    a = torch.randn(3 * r, r, generator=gen, dtype=torch.float64)
    gram = a.T @ a
    regularizer = torch.eye(r, dtype=torch.float64) + 0.5  # any SPD matrix
    matrix = gram + 0.1 * regularizer
    rhs = torch.randn(r, generator=gen, dtype=torch.float64)
    factor, out = np.zeros((r, r)), np.empty(r)
    assert shifted_cholesky(gram.numpy(), 0.1, regularizer.numpy(), factor)
    factored_solve(factor, rhs.numpy(), out)
    expected = torch.linalg.cholesky(matrix)
    torch.testing.assert_close(torch.from_numpy(np.tril(factor)), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.from_numpy(out), torch.linalg.solve(matrix, rhs), rtol=1e-10, atol=1e-12
    )
    # The conditioning check: ||L^{-1}||_F, with L^{-1} itself in the scratch matrix.
    inverse = np.zeros((r, r))
    norm = inverse_frobenius(factor, inverse)
    expected_inverse = torch.linalg.inv(expected)
    torch.testing.assert_close(
        torch.from_numpy(np.tril(inverse)), expected_inverse, rtol=1e-10, atol=1e-12
    )
    assert norm == pytest.approx(float(expected_inverse.norm()), rel=1e-12)
    # The gradient's scaling multiplies by that inverse's lower triangle.
    scaled = np.empty(r)
    lower_times(inverse, rhs.numpy(), scaled)
    torch.testing.assert_close(
        torch.from_numpy(scaled), expected_inverse @ rhs, rtol=1e-10, atol=1e-12
    )
    indefinite = matrix.clone()
    indefinite[r - 1, r - 1] = -1.0
    assert not shifted_cholesky(indefinite.numpy(), 0.0, regularizer.numpy(), factor)


@pytest.mark.parametrize("r", [1, 2, 3, 4, 5, 6, 7, 12, 13, 33])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 130])
def test_compiled_gram_updates_in_tiles_and_by_keys(r, count):
    """``gram += sum_j s_j m_j m_j^T`` over some keys, in 3 x 4 tiles of a column-major copy (from
    :data:`TILED_KEYS` keys on) or four keys per pass (fewer), agrees with NumPy on the lower
    triangle at every ``r`` modulo 3 and 4; the tiles read only the first ``count`` columns."""
    from captum_effattn.projection.solvers.newton_kernels import (
        TILED_KEYS,
        add_column_products,
        add_keys_to_gram,
    )

    rng = np.random.default_rng(100 * r + count)
    n = count + 5
    basis = rng.standard_normal((n, r))
    keys = rng.permutation(n)[:count].astype(np.int64)
    signs = rng.choice([-1.0, 1.0], size=n)
    start = rng.standard_normal((r, r))
    expected = start + (basis[keys].T * signs[:count]) @ basis[keys]
    scratch = (np.full((r, n + 8), np.nan), np.full((r, n + 8), np.nan))
    gram = start.copy()
    add_keys_to_gram(gram, basis, keys, signs, count, scratch)
    np.testing.assert_allclose(np.tril(gram), np.tril(expected), rtol=1e-12, atol=1e-12)
    assert np.isnan(scratch[0]).all() == (count < TILED_KEYS)  # which path ran
    # The tiles alone, with garbage past the summed columns.
    columns = np.hstack([basis[keys].T, np.full((r, 3), np.inf)])
    gram = start.copy()
    add_column_products(gram, columns * np.append(signs[:count], [1.0] * 3), columns, count)
    np.testing.assert_allclose(np.tril(gram), np.tril(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 11, 128])
@pytest.mark.parametrize("positive_share", [0.0, 0.3, 1.0])
def test_compiled_products_with_the_keys(n, positive_share):
    """``B @ v`` four rows at a time, and the dual gradient over the positive keys four at a
    time, agree with NumPy whatever ``n`` and however many keys are positive."""
    from captum_effattn.projection.solvers.newton_kernels import dual_gradient, rows_times

    rng = np.random.default_rng(n)
    r = 7
    basis, vector = rng.standard_normal((n, r)), rng.standard_normal(r)
    out = np.empty(n)
    rows_times(basis, vector, out)
    np.testing.assert_allclose(out, basis @ vector, rtol=1e-12, atol=1e-12)
    u = rng.standard_normal(n)
    u = np.where(rng.random(n) < positive_share, np.abs(u), -np.abs(u))
    target, gradient, scratch = rng.standard_normal(r), np.empty(r), np.empty(n, dtype=np.int64)
    dual_gradient(basis, u, target, gradient, scratch)
    np.testing.assert_allclose(
        gradient, target - basis.T @ np.maximum(u, 0), rtol=1e-12, atol=1e-12
    )


def test_a_hessian_no_damping_repairs_gives_a_zero_direction():
    """A NaN in the support's Gram matrix (which validated inputs never produce) stops the
    damping loop with a zero direction instead of damping forever."""
    from captum_effattn.projection.solvers.newton_kernels import regularized_direction

    r = 4
    gram, regularizer = np.eye(r), np.eye(r)
    gram[2, 1] = np.nan
    factor, direction = np.zeros((r, r)), np.ones(r)
    regularized_direction(gram, regularizer, np.ones(r), 1e-3, factor, direction)
    assert (direction == 0).all()
    gram[2, 1] = 0.5  # damped into a solvable system: the direction solves it
    regularized_direction(gram, regularizer, np.ones(r), 1e-3, factor, direction)
    hessian = np.tril(gram) + np.tril(gram, -1).T + 1e-3 * regularizer
    np.testing.assert_allclose(hessian @ direction, np.ones(r), rtol=1e-12, atol=1e-12)


def test_converges_where_the_optimum_is_degenerate():
    """n much larger than d: most keys leave the support; the gradient tolerance is met."""
    ops, c = dual_problem(3, 8, 200, 6, 10, seed=5)
    theta, steps, converged = compiled_newton_phase(ops, c, c.clone(), 200, 1e-13)
    assert converged.all()
    residual = c - ops.right(ops.left(theta).clamp_min(0))
    assert residual.norm(dim=-1).max() <= 1e-13
    assert (steps > 1).any()


def test_the_starting_point_is_not_modified():
    ops, c = dual_problem(2, 3, 30, 4, 0, seed=1)
    start = c.clone()
    compiled_newton_phase(ops, c, start, 50, 1e-13)
    assert torch.equal(start, c)


@pytest.mark.parametrize("numba_pool", [True, False])
def test_threads_share_the_rows_without_changing_any(monkeypatch, numba_pool):
    """Rows are independent: one thread or several, in small blocks, on numba's pool or on Python
    threads, the same bits."""
    import captum_effattn.projection.solvers.compiled_newton as compiled

    ops, c = dual_problem(4, 9, 80, 8, 3, seed=2)
    values, key_mask, group, rows = grouped_rows_problem(5, 7, 70, 6, 5, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = compiled_newton_phase(ops, c, c.clone(), 50, 1e-13)
        alone_values = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13)
        torch.set_num_threads(2)
        monkeypatch.setattr(compiled, "BLOCK_ROWS", 1)
        monkeypatch.setattr(compiled, "PYTHON_BLOCK_ROWS", 1)
        if not numba_pool:
            monkeypatch.setattr(compiled, "_numba_pool_usable", lambda: False)
        shared = compiled_newton_phase(ops, c, c.clone(), 50, 1e-13)
        shared_values = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13)
    finally:
        torch.set_num_threads(before)
    assert alone_values[2].all()  # solved: the comparison is not between empty rows
    for one, other in zip(alone + alone_values, shared + shared_values, strict=True):
        assert torch.equal(one, other)


def test_a_few_rows_stay_on_the_calling_thread_without_numbas_pool(monkeypatch):
    """On Python threads a block is a hand-off: fewer rows than two blocks' worth are solved on
    the calling thread, however many threads the caller allows."""
    import captum_effattn.projection.solvers.compiled_newton as compiled

    def no_pool(*args):
        raise AssertionError("a Python thread pool for rows that fit in one block")

    monkeypatch.setattr(compiled, "_numba_pool_usable", lambda: False)
    monkeypatch.setattr(compiled, "_pool", no_pool)
    values, key_mask, group, rows = grouped_rows_problem(2, 2, 40, 6, 1, seed=4)
    rows, group = rows[: compiled.PYTHON_BLOCK_ROWS], group[: compiled.PYTHON_BLOCK_ROWS]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x, _, solved, _ = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13)
    finally:
        torch.set_num_threads(before)
    assert solved.all()
    assert x.shape == rows.shape


def test_numba_pool_settings_are_restored_and_not_used_after_a_fork():
    """The caller's numba thread count comes back; a forked child (GNU OpenMP does not survive a
    fork) solves on Python threads instead, with the same rows."""
    import multiprocessing

    import numba

    import captum_effattn.projection.solvers.compiled_newton as compiled

    values, key_mask, group, rows = grouped_rows_problem(5, 7, 70, 6, 5, seed=4)
    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(2)
        numba.set_num_threads(1)
        x, _, solved, _ = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
    assert solved.all()
    if not compiled._numba_pool_usable():
        pytest.skip(f"numba's threading layer is {numba.threading_layer()}: Python threads only")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_solve_in_child, args=(queue, values, key_mask, group, rows))
    child.start()
    usable_in_child, x_child = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert usable_in_child is False
    assert torch.equal(torch.from_numpy(x_child), x)


def _solve_in_child(queue, values, key_mask, group, rows) -> None:
    import captum_effattn.projection.solvers.compiled_newton as compiled

    torch.set_num_threads(2)
    x, _, _, _ = compiled_value_newton(values, key_mask, group, rows, 200, 1e-13)
    queue.put((compiled._numba_pool_usable(), x.numpy()))  # plain bytes, not a shared tensor


@pytest.mark.parametrize("causal", [False, True])
def test_efficient_attention_agrees_across_cpu_backends(causal):
    gen = torch.Generator().manual_seed(7)
    n, d = 48, 6
    attn = attention_rows(2, 3, n, n, sharpness=3.0, generator=gen)
    values = value_vectors(2, 3, n, d, generator=gen)
    key_mask = torch.ones(2, 1, n, dtype=torch.bool)
    key_mask[1, :, n - 7 :] = False
    attn = attn * key_mask[..., None, :]
    if causal:
        attn = attn.tril()
    attn = attn / attn.sum(-1, keepdim=True)
    results = {
        backend: efficient_attention(
            attn, values, key_mask, causal, backend=backend, return_certificate=True
        )
        for backend in ("torch", "numba")
    }
    (x_torch, cert_torch), (x_numba, cert_numba) = results["torch"], results["numba"]
    assert cert_torch.all_converged
    assert cert_numba.all_converged
    torch.testing.assert_close(x_numba, x_torch, atol=1e-10, rtol=0)
    assert head_output_error(x_numba, attn, values).max() <= 1e-9


def test_auto_compiles_newton_for_cpu_tensors():
    assert resolve_backend("auto", torch.device("cpu")) == NumbaBackend(forced=False)
    assert resolve_backend("numba", torch.device("cpu")).newton_steps == 1000


def test_numba_is_refused_for_tensors_off_the_cpu():
    with pytest.raises(KernelUnavailableError, match=r"backend='numba' .* got tensors on meta"):
        resolve_backend("numba", torch.device("meta"))


WITHOUT_NUMBA = """
import sys
sys.modules["numba"] = None
import torch
from captum_effattn.projection.engine.backends import resolve_backend
print(resolve_backend("auto", torch.device("cpu")).name)
from captum_effattn import efficient_attention
attn = torch.full((2, 40), 1 / 40, dtype=torch.float64)
efficient_attention(attn, torch.randn(40, 3, dtype=torch.float64), backend="numba")
"""


def test_without_numba_auto_falls_back_and_forcing_it_says_how_to_install():
    result = subprocess.run([sys.executable, "-c", WITHOUT_NUMBA], capture_output=True, text=True)
    assert result.stdout.strip() == "torch"
    assert "backend='numba' needs the numba package: pip install 'captum-effattn[numba]'" in (
        result.stderr
    )


@cache
def _claims_kernel():
    """A parallel loop whose threads claim blocks as fast as they can (compiled once)."""
    from numba import njit, prange

    from captum_effattn.projection.solvers.newton_kernels import claim_block

    @njit(parallel=True)
    def claims(rows, block, threads, rounds):
        counts = np.zeros((rounds, rows), dtype=np.int64)
        for round_ in range(rounds):
            counter = np.zeros(1, dtype=np.int64)
            for _ in prange(threads):
                while True:
                    start, stop = claim_block(counter, rows, block)
                    if start >= rows:
                        break
                    for row in range(start, stop):
                        counts[round_, row] += 1
        return counts

    return claims


@pytest.mark.parametrize(
    ("rows", "block", "threads"), [(0, 1, 2), (1, 1, 4), (997, 1, 4), (300, 7, 3)]
)
def test_threads_claim_every_row_exactly_once(rows, block, threads):
    """The drivers' threads claim blocks from one counter: an add that is not atomic would hand
    some rows to two threads; every row must go to exactly one, in every one of 50 rounds."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        counts = _claims_kernel()(rows, block, threads, 50)
    finally:
        numba.set_num_threads(before)
    assert counts.shape == (50, rows)
    assert (counts == 1).all()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), block=st.integers(1, 9), threads=st.integers(1, 4))
def test_parallel_driver_solves_every_row_as_one_thread_does(rows, block, threads):
    """``value_newton_blocks`` (threads claiming blocks) returns, row for row and bit for bit, what
    ``value_newton_rows`` returns on one thread: whichever thread solves a row, it is solved once
    and alone."""
    import numba

    from captum_effattn.projection.basis import MAX_INVERSE_NORM
    from captum_effattn.projection.solvers import newton_kernels
    from captum_effattn.projection.solvers.compiled_newton import _settings

    gen = np.random.default_rng(rows * 100 + block * 10 + threads)
    sources, keys, width = 3, 48, 6
    values = gen.standard_normal((sources, keys, width)).astype(np.float32)
    key_mask = np.ones((sources, keys), dtype=np.bool_)
    key_mask[1, 40:] = False
    source = gen.integers(0, sources, rows).astype(np.int64)
    prefix = np.full(rows, keys, dtype=np.int64)
    attn = gen.dirichlet(np.full(keys, 0.3), rows) if rows else np.zeros((0, keys))
    settings_ = _settings(200, 1e-12)

    def outputs():
        return (
            np.zeros((rows, keys)),
            np.zeros(rows),
            np.zeros(rows, dtype=np.int64),
            np.zeros(rows, dtype=np.bool_),
        )

    alone, shared = outputs(), outputs()
    common = (values, key_mask, source, prefix, attn, settings_, MAX_INVERSE_NORM)
    newton_kernels.value_newton_rows(*common, *alone, False)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        newton_kernels.value_newton_blocks(*common, *shared, False, block, threads)
    finally:
        numba.set_num_threads(before)
    for one, other in zip(alone, shared, strict=True):
        np.testing.assert_array_equal(one, other)
    assert shared[3].sum() >= rows - 1  # the rows were solved, not all skipped alike
