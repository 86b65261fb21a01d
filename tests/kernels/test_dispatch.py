"""``backend=``: the projections through the kernels agree with the PyTorch path; bad requests
get specific errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from captum_effattn.projection import (
    effective_attention,
    effective_attention_from_qk,
    efficient_attention,
    efficient_attention_from_qk,
)
from captum_effattn.projection.engine.backends import TritonBackend
from tests.projection.problems import attention_rows, value_vectors


def agree(kernel: torch.Tensor, reference: torch.Tensor, rtol: float) -> None:
    assert kernel.dtype == reference.dtype
    error = float((kernel.cpu().double() - reference.double()).abs().max())
    assert error <= rtol * float(reference.abs().max()), f"max error {error:.2e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projections_agree_across_backends(causal, dtype, gen, device):
    """n > d + 1 so the solver works (Newton and interior point), padding on one example."""
    n, d = 30, 6
    attn = attention_rows(2, 1, n, n, sharpness=2.0, generator=gen)
    mask = torch.ones(2, 1, n, dtype=torch.bool)
    mask[1, :, n - 5 :] = False
    attn = attn * mask[..., None, :]
    if causal:
        attn = attn.tril()
    attn = (attn / attn.sum(-1, keepdim=True)).to(dtype)
    values = value_vectors(2, 1, n, d, generator=gen).to(dtype)
    for project in (efficient_attention, effective_attention):
        reference, cert = project(
            attn, values, mask, causal, backend="torch", return_certificate=True
        )
        kernel, kernel_cert = project(
            attn.to(device), values.to(device), mask.to(device), causal,
            backend="triton", return_certificate=True,
        )  # fmt: skip
        agree(kernel, reference, 1e-10 if dtype == torch.float64 else 1e-5)
        assert kernel_cert.converged.cpu().equal(cert.converged)
        assert kernel_cert.iterations.cpu().equal(cert.iterations)
        # Not a vacuous comparison: the rows moved (and the efficient solver iterated).
        assert (reference - attn).abs().max() > 1e-2
        assert project is effective_attention or cert.iterations.max() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_from_qk_agrees_with_materializing_and_across_backends(causal, gen, device):
    """Grouped-query heads (4 query heads over 2 key/value heads), padding, d_k = 32."""
    batch, heads, kv_heads, n, d_k, d_v = 2, 4, 2, 60, 32, 6
    query = torch.randn(batch, heads, n, d_k, generator=gen)
    key = torch.randn(batch, kv_heads, n, d_k, generator=gen)
    values = torch.randn(batch, kv_heads, n, d_v, generator=gen)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, n - 11 :] = False
    rows = [0, n - 15, -1]
    # The materializing path: the whole (n, n) softmax per head, then efficient attention.
    scores = query.double() @ key.double().repeat_interleave(2, 1).mT / d_k**0.5
    visible = mask[:, None, None, :] & (torch.ones(n, n).tril().bool() if causal else True)
    full = scores.masked_fill(~visible, -torch.inf).softmax(-1)
    index = torch.tensor(rows) % n
    kv_values = values.double().repeat_interleave(2, 1)
    if causal:
        expected = efficient_attention(full, kv_values, mask[:, None], causal=True)[:, :, index]
    else:
        expected = efficient_attention(full[:, :, index], kv_values, mask[:, None])
    for backend in ("torch", "triton"):
        args = [t.to(device) for t in (query, key, values, mask)]
        x = efficient_attention_from_qk(*args, causal, rows=rows, backend=backend)
        assert x.shape == (batch, heads, 3, n)
        agree(x, expected.float(), 1e-5)


def test_effective_from_qk_runs_the_fused_projection(gen, device):
    query = torch.randn(1, 2, 50, 32, generator=gen, dtype=torch.float64)
    key = torch.randn(1, 2, 50, 32, generator=gen, dtype=torch.float64)
    values = torch.randn(1, 2, 50, 8, generator=gen, dtype=torch.float64)
    reference = effective_attention_from_qk(query, key, values, rows=[1, 2], backend="torch")
    kernel = effective_attention_from_qk(
        *(t.to(device) for t in (query, key, values)), rows=[1, 2], backend="triton"
    )
    agree(kernel, reference, 1e-12)


def test_unknown_backend(gen):
    attn = attention_rows(2, 5, generator=gen)
    choices = r"\('auto', 'torch', 'numba', 'triton', 'cudagraph'\)"
    with pytest.raises(ValueError, match=f"backend must be one of {choices}"):
        efficient_attention(attn, value_vectors(5, 2, generator=gen), backend="cuda")


def test_kernel_limits_fall_back_under_auto_and_raise_when_forced(gen, device):
    matrices = torch.randn(1, 10, 300, dtype=torch.float64, device=device)
    group = torch.zeros(2, dtype=torch.long, device=device)
    fallback = TritonBackend(forced=False).grouped(matrices, group)
    assert type(fallback).__name__ == "GroupedMatrices"
    with pytest.raises(ValueError, match=r"basis width is 300, beyond the kernels' limit of 256"):
        TritonBackend(forced=True).grouped(matrices, group)


def test_mismatched_devices_are_refused(gen):
    query = torch.randn(1, 2, 10, 16, generator=gen)
    with pytest.raises(ValueError, match=r"query is on cpu but key is on meta"):
        efficient_attention_from_qk(query, query.to("meta"), query[..., :4], backend="triton")


def _run_without_interpreter(code: str, block_triton: bool) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['triton'] = None\n" if block_triton else ""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env
    )


FORCED_ON_CPU = """
import torch
from captum_effattn import efficient_attention
attn = torch.full((2, 40), 1 / 40, dtype=torch.float64)
efficient_attention(attn, torch.randn(40, 3, dtype=torch.float64), backend="triton")
"""


@pytest.mark.parametrize(
    ("block_triton", "message"),
    [
        (True, r"backend='triton' needs the triton package: pip install 'captum-effattn\[gpu\]'"),
        (False, r"the Triton kernels run on CUDA tensors; got tensors on cpu"),
    ],
)
def test_forcing_kernels_where_they_cannot_run(block_triton, message):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result = _run_without_interpreter(FORCED_ON_CPU, block_triton)
    assert result.returncode != 0
    assert "KernelUnavailableError" in result.stderr
    assert __import__("re").search(message, result.stderr), result.stderr[-2000:]
