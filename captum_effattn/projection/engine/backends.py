"""Which implementation computes the projections' hot paths: a registry of backend objects.

- ``"torch"``: batched PyTorch everywhere.
- ``"numba"`` (CPU tensors, the ``numba`` extra): the semismooth Newton phase of efficient
  attention compiled row by row
  (:mod:`captum_effattn.projection.solvers.compiled_newton`), run on ``[1, V]`` itself where it is
  well conditioned (no orthonormal bases); everything else as ``"torch"``.
- ``"triton"`` (CUDA tensors, the ``gpu`` extra): Triton kernels for the solver's matrix products
  and the streamed attention rows, falling back to PyTorch where a problem exceeds the kernels'
  limits (rows wider than :data:`~captum_effattn.kernels._support.MAX_WIDTH`, masks the attention
  kernel does not implement).
- ``"cudagraph"`` (CUDA tensors): batched PyTorch with the Newton phase in fixed-shape blocks of
  steps captured in a CUDA graph (:mod:`captum_effattn.projection.solvers.static_newton`): one
  launch and one read-back per block of steps instead of some forty launches and several reads
  per step.

Every backend is an object behind the :class:`Backend` protocol, registered in :data:`BACKENDS`
by name; ``backend=`` strings resolve through :func:`resolve_backend`. ``backend="auto"`` picks
the first available backend of :data:`AUTO_ORDER` for the tensors' device: numba on CPU, PyTorch
elsewhere (on CUDA the Triton kernels keep memory low but were slower than PyTorch's batched
products where measured; ``backend="triton"`` selects them). A named backend
insists: it raises where it cannot run (package missing, tensors on the wrong device, sizes beyond
the kernels' limits) instead of falling back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import torch

from captum_effattn.kernels._support import (
    INSTALL_HINT,
    MAX_WIDTH,
    KernelUnavailableError,
    check_width,
    device_problem,
    triton_available,
)
from captum_effattn.projection.engine.grouped import (
    GroupedMatrices,
    GroupedProducts,
    TritonGroupedMatrices,
)
from captum_effattn.projection.engine.rows import (
    RowMasking,
    attention_rows_torch,
    stacked_attention_rows,
)
from captum_effattn.projection.solvers.compiled_newton import (
    ValueNewton,
    ValueProjection,
    compiled_newton_phase,
    compiled_value_newton,
    compiled_value_projection,
    numba_available,
)
from captum_effattn.projection.solvers.newton import NewtonResult, newton_phase
from captum_effattn.projection.solvers.static_newton import GraphCaptureError, static_newton_phase

NUMBA_INSTALL_HINT = "pip install 'captum-effattn[numba]'"


class Backend(Protocol):
    """What a backend is: a name, whether it can run, and the hot paths it implements.

    Attributes:
        name: the ``backend=`` string that selects it.
        forced: the caller named it: limits raise instead of falling back to PyTorch.
        newton_steps: default cap on Newton steps per row.
        batched_newton: whether the Newton phase runs as batched PyTorch operations.
        fused_projection: whether its products project rows onto an orthonormal basis in one
            kernel (effective attention then always builds the basis).
    """

    name: ClassVar[str]
    newton_steps: ClassVar[int]
    batched_newton: ClassVar[bool]
    fused_projection: ClassVar[bool]

    @property
    def forced(self) -> bool:
        """Whether the caller named it (limits raise instead of falling back)."""
        ...

    def insisting(self) -> Backend:
        """The same backend, forced."""
        ...

    def available(self) -> bool:
        """Whether its package is installed."""
        ...

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why it cannot compute for tensors on ``device``, or ``None`` when it can."""
        ...

    def grouped(self, matrices: torch.Tensor, group: torch.Tensor) -> GroupedProducts:
        """Per-group products of ``matrices`` ``(G, n, r)`` for rows in groups ``group``."""
        ...

    def stacked_attention_rows(
        self,
        queries: Sequence[torch.Tensor],
        keys: Sequence[torch.Tensor],
        rows: torch.Tensor,
        masking: RowMasking,
        scale: float,
    ) -> torch.Tensor:
        """Attention rows of one layer or several (heads stacked), as
        :func:`.rows.stacked_attention_rows` computes them."""
        ...

    def newton(
        self, ops: GroupedProducts, c: torch.Tensor, theta: torch.Tensor, max_iter: int, tol: float
    ) -> NewtonResult:
        """The semismooth Newton phase (as :func:`..solvers.newton.newton_phase`)."""
        ...

    @property
    def value_newton(self) -> ValueNewton | None:
        """Efficient-attention rows by Newton on ``[1, V]`` itself, or ``None``."""
        ...

    @property
    def value_projection(self) -> ValueProjection | None:
        """Effective-attention rows projected on ``V`` itself, or ``None``."""
        ...


@dataclass(frozen=True)
class TorchBackend:
    """Batched PyTorch everywhere (any device)."""

    forced: bool = False
    name: ClassVar[str] = "torch"
    newton_steps: ClassVar[int] = 50
    batched_newton: ClassVar[bool] = True
    fused_projection: ClassVar[bool] = False

    def insisting(self) -> Backend:
        """The same backend with :attr:`forced` set."""
        return replace(self, forced=True)

    def available(self) -> bool:
        """Always: PyTorch is a dependency."""
        return True

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Never: PyTorch computes on any device."""
        return None

    def grouped(self, matrices: torch.Tensor, group: torch.Tensor) -> GroupedProducts:
        """:class:`GroupedMatrices` of ``matrices`` ``(G, n, r)``."""
        return GroupedMatrices(matrices, group)

    def stacked_attention_rows(
        self,
        queries: Sequence[torch.Tensor],
        keys: Sequence[torch.Tensor],
        rows: torch.Tensor,
        masking: RowMasking,
        scale: float,
    ) -> torch.Tensor:
        """:func:`~captum_effattn.projection.engine.rows.stacked_attention_rows`."""
        return stacked_attention_rows(queries, keys, rows, masking, scale)

    def newton(
        self, ops: GroupedProducts, c: torch.Tensor, theta: torch.Tensor, max_iter: int, tol: float
    ) -> NewtonResult:
        """:func:`~captum_effattn.projection.solvers.newton.newton_phase`."""
        return newton_phase(ops, c, theta, max_iter, tol)

    @property
    def value_newton(self) -> ValueNewton | None:
        """``None``: the batched solver always works in orthonormal bases."""
        return None

    @property
    def value_projection(self) -> ValueProjection | None:
        """``None``: batched products project through the normal equations or a basis."""
        return None


@dataclass(frozen=True)
class NumbaBackend(TorchBackend):
    """The Newton phase compiled row by row (CPU tensors); everything else as PyTorch."""

    name: ClassVar[str] = "numba"
    # A compiled step is cheap: letting Newton finish beats handing rows to the interior point.
    # Near-one-hot rows can need hundreds of steps: of 506,232 rows of MiniLM on IMDB reviews,
    # 1,013 needed more than 200 and 19 more than 1,000 (benchmarks/bench_rows_robustness.py).
    # At 200 they went on to the basis route and the interior point, at twice the cost; a row
    # that never finishes costs the 1,000 steps.
    newton_steps: ClassVar[int] = 1000
    batched_newton: ClassVar[bool] = False

    def available(self) -> bool:
        """Whether ``numba`` is installed."""
        return numba_available()

    def unavailable_reason(self, device: torch.device) -> str | None:
        """The package missing, or tensors off the CPU."""
        if not self.available():
            return f"backend='numba' needs the numba package: {NUMBA_INSTALL_HINT}"
        if device.type != "cpu":
            return (
                f"backend='numba' compiles the solver for CPU tensors; got tensors on {device} "
                "(use backend='auto', 'torch' or 'triton' there)"
            )
        return None

    def newton(
        self, ops: GroupedProducts, c: torch.Tensor, theta: torch.Tensor, max_iter: int, tol: float
    ) -> NewtonResult:
        """:func:`~captum_effattn.projection.solvers.compiled_newton.compiled_newton_phase`."""
        return compiled_newton_phase(ops, c, theta, max_iter, tol)

    @property
    def value_newton(self) -> ValueNewton | None:
        """:func:`~captum_effattn.projection.solvers.compiled_newton.compiled_value_newton`."""
        return compiled_value_newton

    @property
    def value_projection(self) -> ValueProjection | None:
        """:func:`~captum_effattn.projection.solvers.compiled_newton.compiled_value_projection`."""
        return compiled_value_projection


def _kernels_interpreted() -> bool:
    from captum_effattn.kernels import grouped

    return grouped.INTERPRETED


@dataclass(frozen=True)
class TritonBackend(TorchBackend):
    """Triton kernels (CUDA tensors) where a problem fits them, PyTorch elsewhere."""

    name: ClassVar[str] = "triton"
    fused_projection: ClassVar[bool] = True

    def available(self) -> bool:
        """Whether ``triton`` is installed."""
        return triton_available()

    def unavailable_reason(self, device: torch.device) -> str | None:
        """The package missing, or tensors the kernels cannot take."""
        if not self.available():
            return f"backend='triton' needs the triton package: {INSTALL_HINT}"
        return device_problem("backend='triton'", device, _kernels_interpreted())

    def _fits(self, what: str, width: int) -> bool:
        """Whether one kernel tile holds a row of ``width`` (raises when forced and it does not)."""
        if width <= MAX_WIDTH:
            return True
        if self.forced:
            check_width("backend='triton'", what, width)
        return False

    def grouped(self, matrices: torch.Tensor, group: torch.Tensor) -> GroupedProducts:
        """:class:`TritonGroupedMatrices`, or :class:`GroupedMatrices` for too wide a basis."""
        if not self._fits("the basis width", matrices.shape[-1]):
            return GroupedMatrices(matrices, group)
        return TritonGroupedMatrices(matrices, group)

    def attention_rows(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        rows: torch.Tensor,
        masking: RowMasking,
        scale: float,
    ) -> torch.Tensor:
        """The streamed kernel, or PyTorch for too wide heads or masks it does not implement."""
        if not self._fits("the head width d_k", query.shape[-1]) or not self._takes(masking):
            return attention_rows_torch(query, key, rows, masking, scale)
        from captum_effattn.kernels.attention import attention_rows_triton

        return attention_rows_triton(query, key, masking.key_mask, rows, masking.causal, scale)

    def stacked_attention_rows(
        self,
        queries: Sequence[torch.Tensor],
        keys: Sequence[torch.Tensor],
        rows: torch.Tensor,
        masking: RowMasking,
        scale: float,
    ) -> torch.Tensor:
        """The streamed kernel layer by layer (it takes one layer's heads at a time)."""
        per_layer = [
            self.attention_rows(query, key, rows, masking, scale)
            for query, key in zip(queries, keys, strict=True)
        ]
        return per_layer[0] if len(per_layer) == 1 else torch.cat(per_layer, dim=1)

    def _takes(self, masking: RowMasking) -> bool:
        if masking.additive is None and masking.key_ranges is None:
            return True
        if self.forced:
            raise KernelUnavailableError(
                "backend='triton': the attention kernel implements padding and causal masks only, "
                "not an additive mask or key windows; use backend='torch' or 'auto'"
            )
        return False


@dataclass(frozen=True)
class CudaGraphBackend(TorchBackend):
    """Batched PyTorch, the Newton phase replayed from a CUDA graph (CUDA tensors)."""

    name: ClassVar[str] = "cudagraph"

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Tensors off CUDA."""
        if device.type != "cuda":
            return (
                f"backend='cudagraph' replays the Newton phase from CUDA graphs: it needs CUDA "
                f"tensors; got tensors on {device} (use backend='auto' there)"
            )
        return None

    def newton(
        self, ops: GroupedProducts, c: torch.Tensor, theta: torch.Tensor, max_iter: int, tol: float
    ) -> NewtonResult:
        """:func:`~captum_effattn.projection.solvers.static_newton.static_newton_phase` with
        ``graphs=True``; where the device cannot capture the graph, :func:`newton_phase` unless
        the backend was named.

        Raises:
            KernelUnavailableError: named, and the device could not capture the phase in a graph.
        """
        try:
            return static_newton_phase(ops, c, theta, max_iter, tol, graphs=True)
        except GraphCaptureError as error:
            if self.forced:
                raise KernelUnavailableError(f"backend='cudagraph': {error}") from error
            return newton_phase(ops, c, theta, max_iter, tol)


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (TorchBackend(), NumbaBackend(), TritonBackend(), CudaGraphBackend())
}
"""Every backend, by the name ``backend=`` selects it with."""

AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("numba", "torch")}
"""The backends ``backend="auto"`` tries for tensors on a device type, in order (default:
:data:`AUTO_DEFAULT`)."""

AUTO_DEFAULT = ("torch",)
"""CUDA included: on one H200 (torch 2.11, triton 3.6) PyTorch's batched products took 0.1 ms per
call against 0.6-1.5 ms for the Triton kernels, and ``efficient_attention`` on every row of 12
heads was 1-4x faster with ``backend="torch"`` (n = 64: 0.5 s vs 2.2 s; n = 512: equal).
``benchmarks/bench_gpu.py`` measures the choice again on a device."""


def backend_choices() -> tuple[str, ...]:
    """The names ``backend=`` accepts: ``"auto"`` and the registered backends."""
    return ("auto", *BACKENDS)


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The backend that computes for tensors on ``device``.

    Raises:
        ValueError: an unknown ``backend`` name (the message lists the choices).
        KernelUnavailableError: a named backend that cannot run here: ``backend="triton"``
            without triton installed, or for tensors the kernels cannot take (CPU tensors unless
            ``TRITON_INTERPRET=1`` was set when the kernel modules were imported);
            ``backend="numba"`` without numba or for non-CPU tensors.
    """
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, AUTO_DEFAULT):
            if BACKENDS[name].unavailable_reason(device) is None:
                return BACKENDS[name]
        return BACKENDS["torch"]
    chosen = BACKENDS.get(backend)
    if chosen is None:
        raise ValueError(f"backend must be one of {backend_choices()}; got {backend!r}")
    reason = chosen.unavailable_reason(device)
    if reason is not None:
        raise KernelUnavailableError(reason)
    return chosen.insisting()
