"""Optional Triton kernels for the projections' hot paths (the ``gpu`` extra installs triton).

- :mod:`captum_effattn.kernels.grouped`: rows times per-group bases, the fused effective
  projection and the solver's masked Gram (Hessian) assembly.
- :mod:`captum_effattn.kernels.attention`: selected attention rows streamed from queries and keys.

The projections pick them through their ``backend=`` argument; nothing here needs to be called
directly. Importing this package does not import triton: the kernel modules do, and they decide
at import whether they run on a GPU or, with ``TRITON_INTERPRET=1`` set before, in Triton's
interpreter on CPU tensors.
"""

from captum_effattn.kernels._support import MAX_WIDTH, KernelUnavailableError, triton_available

__all__ = ["MAX_WIDTH", "KernelUnavailableError", "triton_available"]
