"""``backend="auto"``: the backend measured fastest on each device type."""

from __future__ import annotations

import torch

from captum_effattn.projection.engine.backends import TritonBackend, resolve_backend


def test_auto_uses_pytorch_on_cuda_even_where_the_triton_kernels_could_run(monkeypatch):
    """On one H200 PyTorch's batched products beat the kernels (see ``AUTO_DEFAULT``): ``auto``
    takes PyTorch there, and ``backend="triton"`` still selects the kernels."""
    monkeypatch.setattr(TritonBackend, "unavailable_reason", lambda self, device: None)
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda).name == "torch"
    assert resolve_backend("triton", cuda).name == "triton"
    assert resolve_backend("auto", torch.device("meta")).name == "torch"
