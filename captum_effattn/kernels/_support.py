"""What the kernels need to run, and the errors they raise when they cannot (no triton import)."""

from __future__ import annotations

import importlib.util

import torch

# Widest row of a tile the kernels keep in registers: basis width r = d + 1 or head width d_k.
MAX_WIDTH = 256

INSTALL_HINT = "pip install 'captum-effattn[gpu]' (Linux; triton==3.7.1 pairs with torch 2.13)"


class KernelUnavailableError(RuntimeError):
    """``backend="triton"``, ``"numba"`` or ``"cudagraph"`` was forced where it cannot run
    (package missing, tensors on a device it does not compute on, sizes beyond the kernels'
    limits, a device that cannot capture the CUDA graph)."""


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is the optional ``gpu`` extra)."""
    return importlib.util.find_spec("triton") is not None


def device_problem(name: str, device: torch.device, interpreted: bool) -> str | None:
    """Why the kernels cannot run on ``device``, or ``None`` when they can.

    Args:
        name: what is asking, for the message.
        device: where the tensors are.
        interpreted: whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``).
    """
    if device.type != "cuda" and not interpreted:
        return (
            f"{name}: the Triton kernels run on CUDA tensors; got tensors on {device}. To run them "
            "on CPU (slowly, for testing), set TRITON_INTERPRET=1 before captum_effattn's kernel "
            "modules are imported"
        )
    if device.type == "cuda" and interpreted:
        return (
            f"{name}: TRITON_INTERPRET=1 was set when the kernels were imported, so they run on "
            f"CPU tensors only; got tensors on {device}"
        )
    return None


def check_device(name: str, device: torch.device, interpreted: bool) -> None:
    """Raise :class:`KernelUnavailableError` unless the kernels can run on ``device`` (see
    :func:`device_problem`)."""
    problem = device_problem(name, device, interpreted)
    if problem is not None:
        raise KernelUnavailableError(problem)


def check_width(name: str, what: str, width: int) -> None:
    """Raise ``ValueError`` if a row width exceeds what one tile holds (:data:`MAX_WIDTH`)."""
    if width > MAX_WIDTH:
        raise ValueError(
            f"{name}: {what} is {width}, beyond the kernels' limit of {MAX_WIDTH}; use "
            "backend='torch' (backend='auto' falls back to it by itself)"
        )
