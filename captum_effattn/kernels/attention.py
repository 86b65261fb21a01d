"""Triton kernel for selected rows of attention, streamed from queries and keys.

``softmax(q_i K^T * scale + mask)`` for the requested query rows ``i`` only: the accelerated
implementation of :func:`captum_effattn.projection.engine.rows.attention_rows_torch`, with its
conventions (padding keys, causal masking with the queries as the last ``n_q`` positions, grouped-
query heads, rows that see no key all zeros), selected through the backends. Each program holds
a block of rows and streams the keys twice: a first pass keeps the running maximum and normaliser
of the softmax (as flash attention does), the second writes the normalised probabilities. Memory
beyond inputs and output is a few tiles: a single row of one head costs ``O(n)``, never ``O(n^2)``.

Precision: scores and softmax in float32 for float16, bfloat16 and float32 inputs (``tl.dot``
accumulates in float32; float32 operands use ``input_precision="ieee"``, never TF32), float64
throughout for float64 inputs. The output is float32 (float64 for float64 inputs). bfloat16
runs on GPUs only: Triton's interpreter computes bfloat16 dots wrongly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from captum_effattn.kernels._support import check_width
from captum_effattn.projection.engine.validation import check_kernel_operands, check_same_device

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _masked_scores(
    q, k_ptr, mask_ptr, out_ptr, scale, positions, keys, dims,
    n, d, offset, stride_kn, stride_kd, stride_mn,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """Scaled scores of a block of rows against a tile of keys; invisible keys at -inf."""
    k = tl.load(
        k_ptr + keys[:, None] * stride_kn + dims[None, :] * stride_kd,
        mask=(keys[:, None] < n) & (dims[None, :] < d),
        other=0.0,
    )
    scores = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=out_ptr.dtype.element_ty)
    visible = (keys < n)[None, :] & (positions >= 0)[:, None]
    if HAS_MASK:
        real = tl.load(mask_ptr + keys * stride_mn, mask=keys < n, other=0)
        visible = visible & (real != 0)[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= positions[:, None] + offset)
    return tl.where(visible, scores * scale, float("-inf"))


@triton.jit
def _attention_rows_kernel(
    q_ptr, k_ptr, mask_ptr, rows_ptr, scale_ptr, out_ptr,
    n_rows, n, d, heads, group, offset,
    stride_rb, stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_or, stride_on,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    batch_head = tl.program_id(0)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = slots < n_rows
    # A padding slot gets position -1: it sees no key, and its row is never stored.
    positions = tl.load(rows_ptr + batch * stride_rb + slots, mask=live, other=-1)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + batch * stride_qb + head * stride_qh
        + positions[:, None] * stride_qn + dims[None, :] * stride_qd,
        mask=live[:, None] & (dims[None, :] < d),
        other=0.0,
    )  # fmt: skip
    k_ptr += batch * stride_kb + (head // group) * stride_kh
    mask_ptr += batch * stride_mb
    scale = tl.load(scale_ptr)
    # Pass 1: running maximum and normaliser of each row's softmax.
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=out_ptr.dtype.element_ty)
    total = tl.zeros((BLOCK_M,), dtype=out_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        scores = _masked_scores(
            q, k_ptr, mask_ptr, out_ptr, scale, positions, keys, dims,
            n, d, offset, stride_kn, stride_kd, stride_mn, HAS_MASK, CAUSAL,
        )  # fmt: skip
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # Rows that have seen no visible key yet keep max -inf: shift by 0 to avoid inf - inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        total = total * tl.exp(row_max - shift) + tl.sum(tl.exp(scores - shift[:, None]), 1)
        row_max = new_max
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    inverse = 1.0 / tl.where(total > 0, total, 1.0)
    # Pass 2: normalised probabilities, one tile of keys at a time.
    out_ptr += batch * stride_ob + head * stride_oh
    for start in range(0, n, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        scores = _masked_scores(
            q, k_ptr, mask_ptr, out_ptr, scale, positions, keys, dims,
            n, d, offset, stride_kn, stride_kd, stride_mn, HAS_MASK, CAUSAL,
        )  # fmt: skip
        probabilities = tl.exp(scores - row_max[:, None]) * inverse[:, None]
        tl.store(
            out_ptr + slots[:, None] * stride_or + keys[None, :] * stride_on,
            probabilities,
            mask=live[:, None] & (keys[None, :] < n),
        )


INTERPRETED = not isinstance(_attention_rows_kernel, triton.runtime.JITFunction)
"""Whether this module's kernel runs in Triton's interpreter (CPU tensors) rather than on a GPU."""


def attention_rows_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    key_mask: torch.Tensor | None,
    rows: torch.Tensor,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Selected rows of ``softmax(Q K^T * scale + mask)``, never the full matrix.

    Args:
        query: ``(B, H_q, n_q, d_k)`` queries (any strides).
        key: ``(B, H_kv, n, d_k)`` keys, same dtype; ``H_q`` a multiple of ``H_kv``.
        key_mask: ``(B, n)`` booleans, ``True`` for real keys, or ``None`` (all real).
        rows: ``(r,)`` integer query positions in ``[0, n_q)`` shared by the batch, or ``(B, r)``
            per example.
        causal: query ``i`` sees keys ``j <= i + n - n_q`` only (the queries are the last ``n_q``
            positions).
        scale: multiplies the scores before the softmax.

    Returns:
        ``(B, H_q, r, n)`` probabilities in float32 (float64 for float64 inputs); masked keys get
        exactly 0 and a row that sees no key is all zeros.
    """
    name = "attention_rows_triton"
    check_kernel_operands(name, {"query": query, "key": key}, DTYPES, INTERPRETED)
    check_same_device(name, "query", query, {"key_mask": key_mask, "rows": rows})
    batch, heads, q_len, d = query.shape
    n, kv_heads = key.shape[2], key.shape[1]
    check_width(name, "the head width d_k", d)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    positions = rows.to(torch.int64).reshape(-1, rows.shape[-1]).contiguous()
    count = positions.shape[-1]
    out = torch.empty(batch, heads, count, n, dtype=work, device=query.device)
    if out.numel() == 0:
        return out
    mask = (
        torch.ones(1, 1, dtype=torch.int8, device=query.device)
        if key_mask is None
        else key_mask.to(torch.int8)
    )
    block_m = 64 if count >= 64 else 16
    grid = (batch * heads, triton.cdiv(count, block_m))
    _attention_rows_kernel[grid](
        query, key, mask, positions,
        torch.tensor([scale], dtype=work, device=query.device), out,
        count, n, d, heads, heads // kv_heads, n - q_len,
        positions.stride(0) if positions.shape[0] > 1 else 0, *query.stride(), *key.stride(),
        mask.stride(0) if key_mask is not None else 0, mask.stride(1),
        *out.stride(),
        HAS_MASK=key_mask is not None, CAUSAL=causal,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return out
