"""The streamed attention-rows kernel against PyTorch and a materialized float64 softmax."""

from __future__ import annotations

import pytest
import torch

from tests.reference import materialized

pytest.importorskip("triton")

from captum_effattn.projection import attention_rows


def inputs(batch, heads, kv_heads, n, d, dtype, gen, hf_layout=False):
    """Queries and keys; with ``hf_layout`` strided views of ``(B, n, H, d)`` tensors."""
    if hf_layout:
        query = torch.randn(batch, n, heads, d, generator=gen).to(dtype).transpose(1, 2)
        key = torch.randn(batch, n, kv_heads, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        query = torch.randn(batch, heads, n, d, generator=gen).to(dtype)
        key = torch.randn(batch, kv_heads, n, d, generator=gen).to(dtype)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[-1, n - n // 3 :] = False  # right padding on the last example
    return query, key, mask


# Agreement with the float64 softmax, relative to the largest probability.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}

CASES = [
    # (batch, heads, kv_heads, n, d, causal, rows)
    (2, 4, 4, 100, 32, False, [0, 57, 99]),
    (1, 4, 2, 77, 64, True, [-1, 3, 3, 40]),
    (2, 2, 1, 130, 128, True, [129, 0]),
    (1, 3, 3, 20, 32, False, None),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "n", "d", "causal", "rows"), CASES)
def test_rows_agree_with_materialized_softmax(
    batch, heads, kv_heads, n, d, causal, rows, dtype, gen, device
):
    query, key, mask = inputs(batch, heads, kv_heads, n, d, dtype, gen, hf_layout=n == 77)
    scaling = 0.7 / d**0.5
    full = materialized(query, key, mask, causal, scaling)
    index = torch.arange(n) if rows is None else torch.tensor(rows) % n
    expected = full[..., index, :]
    kernel = attention_rows(
        query.to(device), key.to(device), mask.to(device), causal,
        rows=rows, scaling=scaling, backend="triton",
    ).cpu()  # fmt: skip
    torch_path = attention_rows(
        query, key, mask, causal, rows=rows, scaling=scaling, backend="torch"
    )
    assert kernel.shape == expected.shape == torch_path.shape
    assert kernel.dtype == dtype
    for result in (kernel, torch_path):
        error = float((result.double() - expected).abs().max())
        assert error <= TOLERANCE[dtype], f"max error {error:.2e}"
    # Masked and future keys get exactly zero.
    assert (kernel[expected == 0] == 0).all()


def test_one_row_of_a_long_sequence_is_a_distribution(gen, device):
    query, key, mask = inputs(1, 2, 1, 700, 64, torch.float32, gen)
    row = attention_rows(
        query.to(device), key.to(device), mask.to(device), True, rows=-1, backend="triton"
    ).cpu()
    assert row.shape == (1, 2, 1, 700)
    assert (row[..., ~mask[0]] == 0).all()
    torch.testing.assert_close(row.double().sum(-1), torch.ones(1, 2, 1, dtype=torch.float64))


def test_bfloat16_in_the_interpreter_is_refused(gen, device):
    if device.type != "cpu":
        pytest.skip("bfloat16 runs on GPUs")
    query, key, _ = inputs(1, 2, 2, 30, 32, torch.bfloat16, gen)
    with pytest.raises(TypeError, match=r"bfloat16 cannot run in Triton's interpreter"):
        attention_rows(query, key, rows=0, backend="triton")


def test_head_width_beyond_the_kernel_limit(gen, device):
    query, key, _ = inputs(1, 1, 1, 20, 300, torch.float32, gen)
    with pytest.raises(
        ValueError, match=r"head width d_k is 300, beyond the kernels' limit of 256"
    ):
        attention_rows(query.to(device), key.to(device), rows=0, backend="triton")


@pytest.mark.parametrize("per_example", [False, True])
def test_kernel_follows_the_rows_module_conventions(per_example, gen, device):
    """Fewer queries than keys (the queries are the last positions), left padding that leaves a
    causal row without keys (all zeros), grouped heads, rows per example: as the PyTorch rows."""
    from captum_effattn.projection.engine.backends import TritonBackend
    from captum_effattn.projection.engine.rows import RowMasking, attention_rows_torch

    query = torch.randn(2, 4, 5, 16, generator=gen)
    key = torch.randn(2, 2, 9, 16, generator=gen)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :6] = False  # query 0 of example 1 is position 4: it sees no real key
    rows = torch.tensor([[0, 4, 2], [0, 3, 1]]) if per_example else torch.tensor([0, 4, 2])
    masking = RowMasking(key_mask=key_mask, causal=True)
    expected = attention_rows_torch(query, key, rows, masking, 0.3)
    on_device = RowMasking(key_mask=key_mask.to(device), causal=True)
    kernel = TritonBackend(forced=True).attention_rows(
        query.to(device), key.to(device), rows.to(device), on_device, 0.3
    )
    torch.testing.assert_close(kernel.cpu(), expected, atol=1e-6, rtol=0)
    assert (expected[1, :, 0] == 0).all()


def test_kernel_refuses_an_additive_mask_when_forced(gen, device):
    from captum_effattn.kernels import KernelUnavailableError
    from captum_effattn.projection.engine.backends import TritonBackend
    from captum_effattn.projection.engine.rows import RowMasking

    query = torch.randn(1, 1, 4, 16, generator=gen).to(device)
    masking = RowMasking(additive=torch.zeros(1, 1, 4, 4, device=device))
    with pytest.raises(KernelUnavailableError, match=r"padding and causal masks only"):
        TritonBackend(forced=True).attention_rows(query, query, torch.arange(4), masking, 1.0)
    fallback = TritonBackend(forced=False).attention_rows(
        query, query, torch.arange(4, device=device), masking, 1.0
    )
    torch.testing.assert_close(fallback.sum(-1), torch.ones(1, 1, 4, device=device))
