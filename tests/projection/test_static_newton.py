"""The read-free Newton phase (CUDA-graph blocks): newton_phase's steps, with nothing read back."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_effattn.kernels import KernelUnavailableError
from captum_effattn.projection.engine.backends import resolve_backend
from captum_effattn.projection.engine.grouped import GroupedMatrices
from captum_effattn.projection.solvers.newton import newton_phase
from captum_effattn.projection.solvers.static_newton import (
    BLOCK_STEPS,
    NewtonBlock,
    static_newton_phase,
)
from tests.projection.problems import dual_problem, grouped_problem_shapes


@settings(max_examples=30, deadline=None)
@given(
    shape=grouped_problem_shapes(),
    max_iter=st.sampled_from([0, 1, BLOCK_STEPS - 1, BLOCK_STEPS + 3, 50]),
)
def test_same_steps_as_the_compacting_newton_phase(shape, max_iter):
    """Same rows converged, the same steps per row, the same rows to rounding, for every step
    budget (whole blocks or not)."""
    ops, c = dual_problem(*shape)
    start = c.clone()
    theta, steps, converged = newton_phase(ops, c, c.clone(), max_iter, 1e-13)
    theta_s, steps_s, converged_s = static_newton_phase(ops, c, start, max_iter, 1e-13)
    assert torch.equal(start, c)  # the starting point is not modified
    assert torch.equal(converged_s, converged)
    assert (steps_s - steps).abs().max() <= 1  # a borderline row's last step may move by one
    assert int(steps_s.max()) <= max_iter
    x, x_s = ops.left(theta).clamp_min(0), ops.left(theta_s).clamp_min(0)
    torch.testing.assert_close(x_s[converged], x[converged], atol=1e-11, rtol=0)


def test_converged_rows_stay_where_they_converged():
    """A finished row is frozen: more steps change neither its point nor its step count."""
    ops, c = dual_problem(3, 6, 50, 6, 2, seed=7)
    block = NewtonBlock.start(ops, c, c, 200, 1e-13)
    block.run(40)
    theta, steps, converged = block.finish()
    assert bool(converged.all())
    frozen = (theta.clone(), steps.clone())
    block.run(BLOCK_STEPS)
    assert torch.equal(block.theta, frozen[0])
    assert torch.equal(block.iterations, frozen[1])


def _on_meta(ops: GroupedMatrices) -> GroupedMatrices:
    """``ops`` with its matrices (and cached outer products) on the meta device: the same
    products, with shapes and no values."""
    ops.gram(torch.ones(len(ops), ops.matrices.shape[1], dtype=ops.matrices.dtype))  # build caches
    ops.matrices = ops.matrices.to("meta")
    for name, cached in ops._cache.items():
        ops._cache[name] = cached.to("meta")
    if hasattr(ops, "_per_row"):
        ops._per_row = ops._per_row.to("meta")
    return ops


@pytest.mark.parametrize("rows_per_group", [1, 8])  # per-row and shared product layouts
def test_a_block_reads_nothing_back(rows_per_group):
    """Meta tensors have shapes but no values: any read (``bool``, ``item``, a boolean mask's
    ``nonzero``) raises on them, so a block that runs on meta tensors can be captured in a CUDA
    graph; the compacting phase, which reads back every step, cannot run there."""
    ops, c = dual_problem(3, rows_per_group, 40, 6, 3, seed=1)
    meta_c = c.to("meta")
    block = NewtonBlock.start(_on_meta(ops), meta_c, meta_c, 50, 1e-13)
    block.run(BLOCK_STEPS)
    assert block.theta.device.type == "meta"
    assert block.theta.shape == c.shape
    with pytest.raises((RuntimeError, NotImplementedError)):
        newton_phase(ops, meta_c, meta_c.clone(), 50, 1e-13)


def test_cudagraph_backend_needs_cuda_tensors():
    with pytest.raises(KernelUnavailableError, match=r"cudagraph.*CUDA tensors.*cpu"):
        resolve_backend("cudagraph", torch.device("cpu"))
