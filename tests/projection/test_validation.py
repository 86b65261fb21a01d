"""The one validation module: each check names the argument, what was expected and what was got."""
# ruff: noqa: E501  (a table of expected messages reads best one case per line)

from __future__ import annotations

import pytest
import torch

from captum_effattn.kernels import KernelUnavailableError
from captum_effattn.projection.engine.validation import (
    check_inputs,
    check_kernel_operands,
    check_key_mask,
    check_qk_inputs,
    check_same_device,
)

QUERY = torch.randn(2, 4, 6, 8)
KEY = torch.randn(2, 2, 6, 8)
VALUES = torch.randn(2, 2, 6, 5)


def qk(**changes):
    args = {
        "query": QUERY,
        "key": KEY,
        "values": VALUES,
        "key_mask": None,
        "causal": False,
        "rows": None,
        "scaling": None,
    }
    return check_qk_inputs(**{**args, **changes})


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"query": [1.0]}, TypeError, r"query must be a torch.Tensor of shape \(\*batch, H_q"),
        ({"key": KEY[0, 0]}, ValueError, r"key must have shape \(\*batch, H_kv, n, d_k\) \(at "),
        ({"key": KEY[..., :7]}, ValueError, r"with d_k = 8 as query .* got key of shape \(2, 2, 6, 7\)"),
        ({"key": torch.randn(2, 3, 6, 8)}, ValueError, r"query has 4 heads and key 3"),
        ({"key": KEY.double()}, TypeError, r"share one dtype; got torch.float32 and torch.float64"),
        ({"key": KEY.to("meta")}, ValueError, r"query is on cpu but key is on meta"),
        ({"values": VALUES[:, :, :5]}, ValueError, r"n = 6 keys, as key .* got values of shape \(2, 2, 5, 5\)"),
        ({"values": VALUES.to("meta")}, ValueError, r"query is on cpu but values is on meta"),
        ({"key_mask": torch.ones(2, 5)}, ValueError, r"key_mask must have shape \(\*batch, n\) with n = 6 keys; got shape \(2, 5\)"),
        ({"key_mask": torch.full((2, 6), 2)}, ValueError, r"key_mask must hold only 0/1"),
        ({"key": torch.randn(3, 2, 6, 8)}, ValueError, r"do not broadcast: query has \(2,\), key has \(3,\)"),
        ({"query": QUERY[..., :4, :], "causal": True}, ValueError, r"n_q = 4 queries over n = 6 keys"),
        ({"scaling": float("inf")}, ValueError, r"scaling must be a finite number; got inf"),
        ({"rows": [6]}, ValueError, r"rows must be query positions in \[-6, 6\) .* got 6"),
        ({"rows": [0.5]}, TypeError, r"rows must be an int, a sequence of ints"),
        ({"values": VALUES.index_fill(2, torch.tensor([3]), torch.nan)}, ValueError, r"values contains 20 non-finite value\(s\) .* first at index \[0, 0, 3, 0\]"),
        (
            {"key_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]), "causal": True, "rows": [1]},
            ValueError,
            r"query row 1 of the example at batch index \[1\] sees no real key \(keys 0..1 are masked\)",
        ),
    ],
)  # fmt: skip
def test_qk_messages(changes, error, message):
    with pytest.raises(error, match=message):
        qk(**changes)


def test_qk_inputs_are_flattened():
    problem = qk(query=QUERY[None].expand(3, -1, -1, -1, -1), rows=-1)
    assert problem.query.shape == (6, 4, 6, 8)
    assert problem.key.shape == (6, 2, 6, 8)
    assert problem.batch_shape == (3, 2)
    assert problem.rows.tolist() == [5]
    assert problem.scale == pytest.approx(8**-0.5)


def test_projection_inputs_messages():
    attn = torch.full((3, 6), 1 / 6)
    with pytest.raises(ValueError, match=r"values must have shape \(\*batch, n, d\) with n = 6"):
        check_inputs(attn, torch.randn(5, 2), None, False)
    with pytest.raises(ValueError, match=r"masks every key of the example at batch index \[\]"):
        check_inputs(attn, torch.randn(6, 2), torch.zeros(6, dtype=torch.bool), False)
    with pytest.raises(TypeError, match=r"key_mask must be a torch.Tensor of shape \(\*batch, n\)"):
        check_key_mask([1, 0], 2, "attn", torch.device("cpu"))


def test_kernel_operand_messages():
    a32, a64 = torch.ones(2, 2), torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"k: operands must share one dtype; got a torch.float32"):
        check_kernel_operands("k", {"a": a32, "b": a64}, (torch.float32,), interpreted=True)
    with pytest.raises(TypeError, match=r"k: dtype torch.float64 is not supported"):
        check_kernel_operands("k", {"a": a64}, (torch.float32,), interpreted=True)
    with pytest.raises(TypeError, match=r"bfloat16 cannot run in Triton's interpreter"):
        check_kernel_operands("k", {"a": a32.bfloat16()}, (torch.bfloat16,), interpreted=True)
    with pytest.raises(ValueError, match=r"k: all tensors must be on one device; got a on cpu"):
        check_kernel_operands("k", {"a": a32, "b": a32.to("meta")}, (torch.float32,), True)
    with pytest.raises(KernelUnavailableError, match=r"k: the Triton kernels run on CUDA tensors"):
        check_kernel_operands("k", {"a": a32}, (torch.float32,), interpreted=False)
    with pytest.raises(ValueError, match=r"k: query is on cpu but rows on meta"):
        check_same_device("k", "query", a32, {"key_mask": None, "rows": a32.to("meta")})
