"""The semismooth Newton phase in fixed-shape blocks of steps that read nothing back to the host.

:func:`.newton.newton_phase` keeps only the unfinished rows and reads values back to the host
every step (which rows finished, how many keys moved, whether the nearest breakpoints held the
step). On a GPU each read waits for the device to drain its queue, and a step is some forty small
kernels whose launch latency outweighs their arithmetic: the solver is latency-bound there
(measured on an H200 for issue 5: about 30 launches per step).

Here every step works on every row, a finished row frozen by a mask, and reads nothing back, so
that :data:`BLOCK_STEPS` steps can be captured once in a CUDA graph and replayed: one launch per
block, and one read per block (has every row finished?). The steps are
:func:`.newton.newton_phase`'s, with the two choices that need a read made the read-free way: the
support's Gram matrix is recomputed every step (not updated from the keys that moved), and the
line search sorts every breakpoint (not the nearest few first). Results agree with
:func:`.newton.newton_phase` to rounding.

On the CPU the same blocks run eagerly (that is what the tests exercise); the compiled ``numba``
phase is the fast CPU route.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captum_effattn.projection.engine.grouped import GroupedProducts
from captum_effattn.projection.solvers.newton import (
    MAX_STEP,
    NewtonResult,
    dual_gradient,
    exact_step,
    newton_direction,
)

BLOCK_STEPS = 8
"""Newton steps per block (per CUDA graph replay): one read-back per block decides whether to go
on, so a row that converges waits at most this many steps of the others."""


class GraphCaptureError(RuntimeError):
    """The Newton block could not be captured in a CUDA graph on this device."""


@dataclass(frozen=True)
class NewtonBlock:
    """Fixed-shape Newton steps on all rows of one problem, updating its state in place.

    Args:
        ops: the rows' orthonormal bases (products per group).
        c: ``(R, r)`` the rows' coordinates ``B^T a``.
        theta: ``(R, r)`` dual points, updated in place.
        converged: ``(R,)`` bool, rows whose gradient norm reached ``tol`` (then frozen).
        iterations: ``(R,)`` int64, steps each row took.
        budget: ``()`` int64, steps left to the whole phase (a step past it changes nothing).
        tol: the gradient norm at which a row is done.
    """

    ops: GroupedProducts
    c: torch.Tensor
    theta: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    budget: torch.Tensor
    tol: float

    @classmethod
    def start(
        cls, ops: GroupedProducts, c: torch.Tensor, theta: torch.Tensor, max_iter: int, tol: float
    ) -> NewtonBlock:
        """A block's state at ``theta`` (copied), ``max_iter`` steps to spend."""
        rows = len(c)
        return cls(
            ops=ops,
            c=c,
            theta=theta.clone(),
            converged=torch.zeros(rows, dtype=torch.bool, device=c.device),
            iterations=torch.zeros(rows, dtype=torch.long, device=c.device),
            budget=torch.tensor(max_iter, dtype=torch.long, device=c.device),
            tol=tol,
        )

    def step(self) -> None:
        """One Newton step on every unfinished row (the rest keep their state)."""
        u, gradient, norm = dual_gradient(self.ops, self.c, self.theta)
        done = self.converged | (norm <= self.tol)
        moving = ~done & (self.budget > 0)
        direction = newton_direction(self.ops.gram((u > 0).to(u.dtype)), gradient, norm)
        slope0 = (direction * self.c).sum(-1)
        step = exact_step(u, self.ops.left(direction), slope0, max_step=MAX_STEP)
        moved = self.theta + step[:, None] * direction
        self.theta.copy_(torch.where(moving[:, None], moved, self.theta))
        self.iterations.add_(moving.to(torch.long))
        self.converged.copy_(done)
        self.budget.sub_(1)

    def run(self, steps: int) -> None:
        """``steps`` steps, eagerly."""
        for _ in range(steps):
            self.step()

    def finish(self) -> NewtonResult:
        """``(theta, iterations, converged)``, convergence judged at the final ``theta``."""
        _, _, norm = dual_gradient(self.ops, self.c, self.theta)
        return self.theta, self.iterations, self.converged | (norm <= self.tol)


def _captured(block: NewtonBlock, steps: int, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``steps`` steps of ``block``, captured on ``stream`` (not run: capturing
    records, it does not execute)."""
    graph = torch.cuda.CUDAGraph()
    try:
        # Thread-local: the attribution pipeline's other thread may be running the forward pass
        # on the same device meanwhile.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            block.run(steps)
    except RuntimeError as error:
        raise GraphCaptureError(
            f"the Newton phase could not be captured in a CUDA graph on "
            f"{torch.cuda.get_device_name(block.c.device)}: {error}"
        ) from error
    return graph


def static_newton_phase(
    basis: GroupedProducts,
    c: torch.Tensor,
    theta: torch.Tensor,
    max_iter: int,
    tol: float,
    *,
    graphs: bool = False,
) -> NewtonResult:
    """:func:`.newton.newton_phase` in blocks of :data:`BLOCK_STEPS` read-free steps.

    Args:
        basis, c, theta, max_iter, tol: as in :func:`.newton.newton_phase` (``theta`` is not
            modified).
        graphs: capture a block in a CUDA graph and replay it (CUDA tensors); otherwise the
            blocks run eagerly.

    Returns:
        ``(theta, iterations, converged)``, each per row.

    Raises:
        GraphCaptureError: ``graphs=True`` and the block cannot be captured on this device.
    """
    block = NewtonBlock.start(basis, c, theta, max_iter, tol)
    if graphs and max_iter > 0 and len(c):
        with torch.cuda.device(c.device):
            _replay(block, max_iter)
    else:
        left = max_iter
        while left > 0 and len(c) and not bool(block.converged.all()):
            block.run(min(BLOCK_STEPS, left))
            left -= BLOCK_STEPS
    return block.finish()


def _replay(block: NewtonBlock, max_iter: int) -> None:
    """``max_iter`` steps of ``block`` (fewer once every row has converged): one eager, the rest
    from a graph of :data:`BLOCK_STEPS` steps."""
    # The eager step runs on the side stream the graph is then captured on, and builds what the
    # steps reuse (the products' cached outer products, the cuBLAS and cuSOLVER workspaces, which
    # are kept per stream) before capture, not inside it.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        block.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = _captured(block, BLOCK_STEPS, side)
    left = max_iter - 1
    while left > 0 and not bool(block.converged.all()):
        graph.replay()
        left -= BLOCK_STEPS
