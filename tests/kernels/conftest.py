"""Kernel tests: Triton's interpreter on CPU tensors unless told otherwise.

``TRITON_INTERPRET`` must be set before the kernel modules are imported (their ``@triton.jit``
decides then), hence here, at collection. On a CUDA machine, run with ``TRITON_INTERPRET=0`` to
test the compiled kernels on the GPU instead. Without triton, each module skips itself.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ["TRITON_INTERPRET"] == "1" and "captum_effattn.kernels.grouped" in sys.modules:
    raise RuntimeError(
        "captum_effattn's kernel modules were imported before tests/kernels/conftest.py could set "
        "TRITON_INTERPRET=1; their kernels would not run on CPU"
    )


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: CPU in the interpreter, else the GPU."""
    from captum_effattn.kernels import grouped

    if grouped.INTERPRETED:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(5)
