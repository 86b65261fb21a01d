"""Which implementation computes the projections' hot paths: PyTorch, numba or Triton.

- ``"torch"``: batched PyTorch everywhere.
- ``"numba"`` (CPU tensors, the ``numba`` extra): the semismooth Newton phase of efficient
  attention compiled row by row (:mod:`._compiled_newton`), run on ``[1, V]`` itself where it is
  well conditioned (no orthonormal bases); everything else as ``"torch"``.
- ``"triton"`` (CUDA tensors, the ``gpu`` extra): Triton kernels for the solver's matrix products
  and the streamed attention rows, falling back to PyTorch where a problem exceeds the kernels'
  limits (rows wider than :data:`~captum_effattn.kernels._support.MAX_WIDTH`).

``backend="auto"`` picks numba for CPU tensors and Triton for CUDA tensors when the package is
installed, PyTorch otherwise. A named backend insists: it raises where it cannot run (package
missing, tensors on the wrong device, sizes beyond the kernels' limits) instead of falling back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captum_effattn.kernels._support import (
    MAX_WIDTH,
    KernelUnavailableError,
    check_device,
    check_width,
    require_triton,
    triton_available,
)
from captum_effattn.projection._compiled_newton import (
    compiled_newton_phase,
    compiled_value_newton,
    numba_available,
)
from captum_effattn.projection._grouped import GroupedMatrices, TritonGroupedMatrices
from captum_effattn.projection._newton import newton_phase

BACKENDS = ("auto", "torch", "numba", "triton")
NUMBA_INSTALL_HINT = "pip install 'captum-effattn[numba]'"


def _kernels_interpreted() -> bool:
    from captum_effattn.kernels import grouped

    return grouped.INTERPRETED


def _attention_rows_torch(query, key, key_mask, rows, causal, scale):
    from captum_effattn.projection._qk import attention_rows_torch

    return attention_rows_torch(query, key, key_mask, rows, causal, scale)


def _attention_rows_triton(query, key, key_mask, rows, causal, scale):
    from captum_effattn.kernels.attention import attention_rows_triton

    return attention_rows_triton(query, key, key_mask, rows, causal, scale)


# The implementations of each hot path, by backend name.
GROUPED = {"torch": GroupedMatrices, "numba": GroupedMatrices, "triton": TritonGroupedMatrices}
ATTENTION_ROWS = {
    "torch": _attention_rows_torch,
    "numba": _attention_rows_torch,
    "triton": _attention_rows_triton,
}
NEWTON = {"torch": newton_phase, "numba": compiled_newton_phase, "triton": newton_phase}
# Efficient attention solved without orthonormal bases where it can be (None: always with them).
VALUE_NEWTON = {"torch": None, "numba": compiled_value_newton, "triton": None}
# Newton steps per row before the interior point takes over, when the caller does not say: a
# compiled step costs microseconds, so letting Newton finish beats the interior point's ~10 ms.
NEWTON_STEPS = {"torch": 50, "numba": 200, "triton": 50}


@dataclass(frozen=True)
class Backend:
    """A resolved backend.

    Attributes:
        name: ``"torch"``, ``"numba"`` or ``"triton"``.
        forced: the caller named it: limits raise instead of falling back to PyTorch.
    """

    name: str
    forced: bool

    def _choose(self, what: str, width: int) -> str:
        """The implementation for rows of ``width`` entries (one kernel tile holds a row)."""
        if self.name == "triton" and width > MAX_WIDTH:
            if self.forced:
                check_width("backend='triton'", what, width)
            return "torch"
        return self.name

    def grouped(self, matrices: torch.Tensor, group: torch.Tensor):
        """Per-group products (:class:`GroupedMatrices` or :class:`TritonGroupedMatrices`)."""
        name = self._choose("the basis width", matrices.shape[-1])
        return GROUPED[name](matrices, group)

    def attention_rows(self, query, key, key_mask, rows, causal: bool, scale: float):
        """Selected attention rows ``(B, H_q, r, n)`` from ``(B, H, n, d_k)`` queries and keys."""
        name = self._choose("the head width d_k", query.shape[-1])
        return ATTENTION_ROWS[name](query, key, key_mask, rows, causal, scale)

    def newton(self, ops, c: torch.Tensor, theta: torch.Tensor, max_iter: int, tol: float):
        """The semismooth Newton phase (see :func:`._newton.newton_phase`)."""
        return NEWTON[self.name](ops, c, theta, max_iter, tol)

    @property
    def value_newton(self):
        """Efficient-attention rows by Newton on ``[1, V]`` itself
        (:func:`._compiled_newton.compiled_value_newton`), or ``None`` on this backend."""
        return VALUE_NEWTON[self.name]

    @property
    def batched_newton(self) -> bool:
        """Whether the Newton phase runs as batched PyTorch operations (many small solves)."""
        return NEWTON[self.name] is newton_phase

    @property
    def newton_steps(self) -> int:
        """Default cap on Newton steps per row."""
        return NEWTON_STEPS[self.name]


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The backend that computes for tensors on ``device``.

    Raises:
        ValueError: an unknown ``backend`` name.
        KernelUnavailableError: ``backend="triton"`` without triton installed, or for tensors the
            kernels cannot take (CPU tensors unless ``TRITON_INTERPRET=1`` was set when the kernel
            modules were imported); ``backend="numba"`` without numba or for non-CPU tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return Backend("numba" if numba_available() else "torch", forced=False)
        kernels = device.type == "cuda" and triton_available() and not _kernels_interpreted()
        return Backend("triton" if kernels else "torch", forced=False)
    if backend == "numba":
        if not numba_available():
            raise KernelUnavailableError(
                f"backend='numba' needs the numba package: {NUMBA_INSTALL_HINT}"
            )
        if device.type != "cpu":
            raise KernelUnavailableError(
                f"backend='numba' compiles the solver for CPU tensors; got tensors on {device} "
                "(use backend='auto', 'torch' or 'triton' there)"
            )
    if backend == "triton":
        require_triton()
        check_device("backend='triton'", device, _kernels_interpreted())
    return Backend(backend, forced=True)
