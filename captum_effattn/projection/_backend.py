"""Which implementation computes the projections' hot paths: PyTorch or the Triton kernels.

``backend="auto"`` uses the kernels for CUDA tensors when ``triton`` is installed and PyTorch
otherwise, and falls back to PyTorch where a problem exceeds the kernels' limits (rows wider than
:data:`~captum_effattn.kernels._support.MAX_WIDTH`). ``backend="triton"`` insists: it raises
where the kernels cannot run (no triton, no CUDA device, sizes beyond the limits) instead of
falling back. ``backend="torch"`` never touches triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captum_effattn.kernels._support import (
    MAX_WIDTH,
    check_device,
    check_width,
    require_triton,
    triton_available,
)
from captum_effattn.projection._grouped import GroupedMatrices, TritonGroupedMatrices

BACKENDS = ("auto", "torch", "triton")


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
GROUPED = {"torch": GroupedMatrices, "triton": TritonGroupedMatrices}
ATTENTION_ROWS = {"torch": _attention_rows_torch, "triton": _attention_rows_triton}


@dataclass(frozen=True)
class Backend:
    """A resolved backend.

    Attributes:
        name: ``"torch"`` or ``"triton"``.
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


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The backend that computes for tensors on ``device``.

    Raises:
        ValueError: an unknown ``backend`` name.
        KernelUnavailableError: ``backend="triton"`` without triton installed, or for tensors the
            kernels cannot take (CPU tensors unless ``TRITON_INTERPRET=1`` was set when the kernel
            modules were imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        kernels = device.type == "cuda" and triton_available() and not _kernels_interpreted()
        return Backend("triton" if kernels else "torch", forced=False)
    if backend == "triton":
        require_triton()
        check_device("backend='triton'", device, _kernels_interpreted())
    return Backend(backend, forced=True)
