"""The Newton phase's exact line search: the maximizing step, with or without a partial sort."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_effattn.projection.solvers.newton import exact_step


def phi(t: torch.Tensor, u: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``t s - 1/2 ||relu(u + t w)||^2`` for each row, at steps ``t`` of shape ``(R, T)``."""
    moved = (u[:, None, :] + t[..., None] * w[:, None, :]).clamp_min(0)
    return t * s[:, None] - 0.5 * (moved**2).sum(-1)


def _problem(rows: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    u[: rows // 3, : n // 2] = 0  # keys exactly at the boundary
    w = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    w = w * (torch.rand(rows, n, generator=gen) > 0.3)  # keys the direction does not move
    s = 3 * torch.randn(rows, generator=gen, dtype=torch.float64)
    return u, w, s


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    n=st.integers(1, 80),
    candidates=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_partial_sort_gives_the_same_step(rows, n, candidates, seed):
    u, w, s = _problem(rows, n, seed)
    assert torch.equal(exact_step(u, w, s, candidates), exact_step(u, w, s))


@pytest.mark.parametrize("candidates", [None, 4])
def test_the_step_maximizes_phi(candidates):
    u, w, s = _problem(30, 50, 3)
    t = exact_step(u, w, s, candidates)
    assert (t >= 0).all()
    grid = torch.linspace(0, 1, 401, dtype=torch.float64)[None, :] * (2 * t[:, None] + 1)
    best_on_grid = phi(grid, u, w, s).amax(-1)
    assert (phi(t[:, None], u, w, s)[:, 0] >= best_on_grid - 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    n=st.integers(1, 80),
    candidates=st.sampled_from([None, 1, 4, 32]),
    max_step=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_a_bounded_step_is_the_unbounded_one_cut_at_the_bound(rows, n, candidates, max_step, seed):
    """phi is concave: its maximizer on ``[0, m]`` is ``min(t*, m)``, with or without a partial
    sort (a row whose candidates reach the bound needs no full sort)."""
    u, w, s = _problem(rows, n, seed)
    w[:, -1] = w[:, -1].abs() + 0.1  # phi bounded above, so t* is finite
    unbounded = exact_step(u, w, s, candidates)
    bounded = exact_step(u, w, s, candidates, max_step)
    torch.testing.assert_close(bounded, unbounded.clamp_max(max_step), rtol=1e-12, atol=0)
    assert bool((bounded <= max_step).all())


def test_the_bounded_step_maximizes_phi_on_its_interval():
    u, w, s = _problem(30, 50, 5)
    t = exact_step(u, w, s, 4, max_step=1.0)
    assert ((t >= 0) & (t <= 1)).all()
    grid = torch.linspace(0, 1, 401, dtype=torch.float64)[None, :].expand(30, -1)
    best_on_grid = phi(grid, u, w, s).amax(-1)
    assert (phi(t[:, None], u, w, s)[:, 0] >= best_on_grid - 1e-9).all()


def test_rows_still_rising_at_the_bound_take_it_without_a_full_sort(monkeypatch):
    """Rows whose sign change lies past both their nearest candidates and ``max_step`` have
    ``phi'(max_step) >= 0``: their step is ``max_step``, and only the others are sorted."""
    import captum_effattn.projection.solvers.newton as newton

    n = 40
    # Every key enters (u < 0 < w) at breakpoint t_i = i / n for i = 1..n: slopes phi'(t) = s -
    # sum over entered keys of w_i (u_i + t w_i); with s large phi still rises past t = 1.
    w = torch.ones(2, n, dtype=torch.float64)
    u = -torch.arange(1, n + 1, dtype=torch.float64).expand(2, -1) / n
    s = torch.tensor([1e6, 4.0], dtype=torch.float64)  # row 1: root near t = 0.47, key 18
    sorted_rows = []
    real_sorted_step = newton.sorted_step

    def counting(breaks, terms, max_step):
        sorted_rows.append(breaks.shape[0])
        return real_sorted_step(breaks, terms, max_step)

    monkeypatch.setattr(newton, "sorted_step", counting)
    step = exact_step(u, w, s, 4, max_step=1.0)
    assert float(step[0]) == 1.0
    assert 0 < float(step[1]) < 1.0
    assert sorted_rows == [1]  # row 1 only: its root lies past its 4 nearest breakpoints
    torch.testing.assert_close(step, exact_step(u, w, s).clamp_max(1.0), rtol=1e-12, atol=0)
