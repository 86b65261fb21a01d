"""What the kernels need to run, and the errors they raise when they cannot (no triton import)."""

from __future__ import annotations

import importlib.util

import torch

# Widest row of a tile the kernels keep in registers: basis width r = d + 1 or head width d_k.
MAX_WIDTH = 256

INSTALL_HINT = "pip install 'captum-effattn[gpu]' (Linux; triton==3.7.1 pairs with torch 2.13)"


class KernelUnavailableError(RuntimeError):
    """``backend="triton"`` or ``"numba"`` was forced where it cannot run (package missing,
    tensors on a device it does not compute on, sizes beyond the kernels' limits)."""


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is the optional ``gpu`` extra)."""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> None:
    """Raise :class:`KernelUnavailableError` unless ``triton`` is installed."""
    if not triton_available():
        raise KernelUnavailableError(f"backend='triton' needs the triton package: {INSTALL_HINT}")


def check_device(name: str, device: torch.device, interpreted: bool) -> None:
    """Raise :class:`KernelUnavailableError` unless the kernels can run on ``device``.

    Args:
        name: what is asking, for the message.
        device: where the tensors are.
        interpreted: whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``).
    """
    if device.type != "cuda" and not interpreted:
        raise KernelUnavailableError(
            f"{name}: the Triton kernels run on CUDA tensors; got tensors on {device}. To run them "
            "on CPU (slowly, for testing), set TRITON_INTERPRET=1 before captum_effattn's kernel "
            "modules are imported"
        )
    if device.type == "cuda" and interpreted:
        raise KernelUnavailableError(
            f"{name}: TRITON_INTERPRET=1 was set when the kernels were imported, so they run on "
            f"CPU tensors only; got tensors on {device}"
        )


def check_kernel_tensors(
    name: str,
    tensors: dict[str, torch.Tensor],
    dtypes: tuple[torch.dtype, ...],
    interpreted: bool,
) -> None:
    """Check that a kernel can take ``tensors``: one device it runs on, supported dtypes.

    Args:
        name: the kernel's name, for messages.
        tensors: the floating-point operands by argument name (all must share one dtype).
        dtypes: the dtypes the kernel supports.
        interpreted: whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``).

    Raises:
        KernelUnavailableError: tensors on a device the kernels cannot use.
        TypeError: an unsupported or mixed dtype (bfloat16 in the interpreter, whose ``tl.dot``
            returns wrong numbers for it).
        ValueError: tensors on different devices.
    """
    devices = {key: t.device for key, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{key} on {device}" for key, device in devices.items())
        raise ValueError(f"{name}: all tensors must be on one device; got {listed}")
    check_device(name, next(iter(devices.values())), interpreted)
    kinds = {key: t.dtype for key, t in tensors.items()}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{key} {dtype}" for key, dtype in kinds.items())
        raise TypeError(f"{name}: operands must share one dtype; got {listed}")
    dtype = next(iter(kinds.values()))
    if dtype not in dtypes:
        raise TypeError(
            f"{name}: dtype {dtype} is not supported; the kernel takes "
            + ", ".join(str(d) for d in dtypes)
        )
    if dtype == torch.bfloat16 and interpreted:
        raise TypeError(
            f"{name}: bfloat16 cannot run in Triton's interpreter (its tl.dot returns wrong "
            "results for bfloat16); cast to float16 or float32, or use backend='torch'"
        )


def check_width(name: str, what: str, width: int) -> None:
    """Raise ``ValueError`` if a row width exceeds what one tile holds (:data:`MAX_WIDTH`)."""
    if width > MAX_WIDTH:
        raise ValueError(
            f"{name}: {what} is {width}, beyond the kernels' limit of {MAX_WIDTH}; use "
            "backend='torch' (backend='auto' falls back to it by itself)"
        )
