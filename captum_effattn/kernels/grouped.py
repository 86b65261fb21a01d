"""Triton kernels for rows times per-group matrices: the projection solver's hot paths.

Row ``j`` of a batch belongs to group ``group[j]`` and is multiplied by that group's matrix
``M_g`` (``(n, k)``: an orthonormal basis of a value space, or the value vectors themselves), as in
:class:`captum_effattn.projection.engine.grouped.GroupedMatrices`, whose PyTorch methods these
kernels replace on CUDA tensors:

- :func:`grouped_right` ``x_j M_g`` and :func:`grouped_left` ``M_g c_j``;
- :func:`grouped_project` the fused effective projection ``(x_j M_g) M_g^T``: each block of rows
  keeps its coordinates in registers between the two passes over the keys;
- :func:`grouped_gram` ``M_g^T diag(w_j) M_g``, the Hessian assembly of both solver phases, tiled
  over keys so that it never builds the ``(n, k^2)`` outer products the PyTorch path uses (memory
  ``O(n k)`` per group instead of ``O(n k^2)``).

Rows are scheduled in blocks that never straddle two groups (a grouped GEMM), so each block is a
dense ``tl.dot`` against its group's matrix. Precision: the operands' dtype, float32 or float64
(the solver runs in float64); float32 dots use ``input_precision="ieee"``, never TF32. float64
``tl.dot`` runs on the FP64 tensor cores of sm80/sm90 GPUs (A100, H100) and on FMA units
elsewhere (slow on consumer GPUs). Block sizes are untuned heuristics: no GPU was available to
time them.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels on CPU tensors in
Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from captum_effattn.kernels._support import check_width
from captum_effattn.projection.engine.validation import check_kernel_operands

DTYPES = (torch.float32, torch.float64)


@triton.jit
def _block_rows(order_ptr, start_ptr, count_ptr, block, BLOCK_R: tl.constexpr):
    """Row ids of one block (padded to ``BLOCK_R``) and which of them are real."""
    start = tl.load(start_ptr + block)
    offsets = tl.arange(0, BLOCK_R)
    live = offsets < tl.load(count_ptr + block)
    rows = tl.load(order_ptr + start + offsets, mask=live, other=0)
    return rows, live


@triton.jit
def _coordinates(
    x_ptr, m_ptr, rows, live, cols, n, k, stride_xr, stride_xn, stride_mn, stride_mk, acc,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``acc + x M`` for one block of rows, accumulated over tiles of keys."""
    for start in range(0, n, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xr + keys[None, :] * stride_xn,
            mask=live[:, None] & (keys[None, :] < n),
            other=0.0,
        )
        m = tl.load(
            m_ptr + keys[:, None] * stride_mn + cols[None, :] * stride_mk,
            mask=(keys[:, None] < n) & (cols[None, :] < k),
            other=0.0,
        )
        acc = tl.dot(x, m, acc, input_precision="ieee", out_dtype=acc.dtype)
    return acc


@triton.jit
def _right_kernel(
    x_ptr, m_ptr, out_ptr, order_ptr, start_ptr, count_ptr, group_ptr,
    n, k,
    stride_xr, stride_xn, stride_mg, stride_mn, stride_mk, stride_or, stride_ok,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    rows, live = _block_rows(order_ptr, start_ptr, count_ptr, block, BLOCK_R)
    m_ptr += tl.load(group_ptr + block).to(tl.int64) * stride_mg
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=out_ptr.dtype.element_ty)
    acc = _coordinates(
        x_ptr, m_ptr, rows, live, cols, n, k, stride_xr, stride_xn, stride_mn, stride_mk, acc,
        BLOCK_N,
    )  # fmt: skip
    tl.store(
        out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_ok,
        acc,
        mask=live[:, None] & (cols[None, :] < k),
    )


@triton.jit
def _left_kernel(
    c_ptr, m_ptr, out_ptr, order_ptr, start_ptr, count_ptr, group_ptr,
    n, k,
    stride_cr, stride_ck, stride_mg, stride_mn, stride_mk, stride_or, stride_on,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, live = _block_rows(order_ptr, start_ptr, count_ptr, block, BLOCK_R)
    m_ptr += tl.load(group_ptr + block).to(tl.int64) * stride_mg
    cols = tl.arange(0, BLOCK_K)
    c = tl.load(
        c_ptr + rows[:, None] * stride_cr + cols[None, :] * stride_ck,
        mask=live[:, None] & (cols[None, :] < k),
        other=0.0,
    )
    m = tl.load(
        m_ptr + keys[:, None] * stride_mn + cols[None, :] * stride_mk,
        mask=(keys[:, None] < n) & (cols[None, :] < k),
        other=0.0,
    )
    out = tl.dot(c, tl.trans(m), input_precision="ieee", out_dtype=c.dtype)
    tl.store(
        out_ptr + rows[:, None] * stride_or + keys[None, :] * stride_on,
        out,
        mask=live[:, None] & (keys[None, :] < n),
    )


@triton.jit
def _project_kernel(
    x_ptr, m_ptr, out_ptr, order_ptr, start_ptr, count_ptr, group_ptr,
    n, k,
    stride_xr, stride_xn, stride_mg, stride_mn, stride_mk, stride_or, stride_on,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    rows, live = _block_rows(order_ptr, start_ptr, count_ptr, block, BLOCK_R)
    m_ptr += tl.load(group_ptr + block).to(tl.int64) * stride_mg
    cols = tl.arange(0, BLOCK_K)
    # Pass 1: coordinates c = x M (BLOCK_R x k) stay in registers.
    coords = tl.zeros((BLOCK_R, BLOCK_K), dtype=out_ptr.dtype.element_ty)
    coords = _coordinates(
        x_ptr, m_ptr, rows, live, cols, n, k, stride_xr, stride_xn, stride_mn, stride_mk, coords,
        BLOCK_N,
    )  # fmt: skip
    # Pass 2: the projection c M^T, one tile of keys at a time.
    for start in range(0, n, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        m = tl.load(
            m_ptr + keys[:, None] * stride_mn + cols[None, :] * stride_mk,
            mask=(keys[:, None] < n) & (cols[None, :] < k),
            other=0.0,
        )
        out = tl.dot(coords, tl.trans(m), input_precision="ieee", out_dtype=coords.dtype)
        tl.store(
            out_ptr + rows[:, None] * stride_or + keys[None, :] * stride_on,
            out,
            mask=live[:, None] & (keys[None, :] < n),
        )


@triton.jit
def _gram_kernel(
    w_ptr, m_ptr, out_ptr, group_ptr, pairs_ptr,
    n, k,
    stride_wr, stride_wn, stride_mg, stride_mn, stride_mk, stride_or, stride_oi, stride_oj,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    # One program per block (bi, bj) with bi <= bj of the symmetric output; it writes both.
    pair = tl.program_id(1)
    block_i = tl.load(pairs_ptr + 2 * pair)
    block_j = tl.load(pairs_ptr + 2 * pair + 1)
    m_ptr += tl.load(group_ptr + row).to(tl.int64) * stride_mg
    w_ptr += row * stride_wr
    cols_i = block_i * BLOCK_K + tl.arange(0, BLOCK_K)
    cols_j = block_j * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=out_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + keys * stride_wn, mask=keys < n, other=0.0)
        m_i = tl.load(
            m_ptr + keys[:, None] * stride_mn + cols_i[None, :] * stride_mk,
            mask=(keys[:, None] < n) & (cols_i[None, :] < k),
            other=0.0,
        )
        m_j = tl.load(
            m_ptr + keys[:, None] * stride_mn + cols_j[None, :] * stride_mk,
            mask=(keys[:, None] < n) & (cols_j[None, :] < k),
            other=0.0,
        )
        acc = tl.dot(
            tl.trans(m_i * w[:, None]), m_j, acc, input_precision="ieee", out_dtype=acc.dtype
        )
    out_ptr += row * stride_or
    inside = (cols_i[:, None] < k) & (cols_j[None, :] < k)
    tl.store(out_ptr + cols_i[:, None] * stride_oi + cols_j[None, :] * stride_oj, acc, inside)
    tl.store(out_ptr + cols_j[None, :] * stride_oi + cols_i[:, None] * stride_oj, acc, inside)


def _is_interpreted() -> bool:
    # Decided by TRITON_INTERPRET when this module was imported: jit gives interpreted functions.
    return not isinstance(_right_kernel, triton.runtime.JITFunction)


INTERPRETED = _is_interpreted()
"""Whether this module's kernels run in Triton's interpreter (CPU tensors) rather than on a GPU."""


def _pow2(size: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(size))


def _key_block(width_block: int) -> int:
    # Keep a (keys x width) float64 tile near 32 KiB of registers.
    return max(16, min(64, 4096 // width_block))


@dataclass(frozen=True)
class RowBlocks:
    """Schedule of rows in blocks of at most ``block_rows`` rows that share one group.

    Attributes:
        order: ``(R,)`` row ids sorted by group.
        start: ``(B,)`` each block's first position in ``order``.
        count: ``(B,)`` rows in each block (``<= block_rows``).
        group: ``(B,)`` each block's group.
        block_rows: rows per block (a power of two, at least 16 for ``tl.dot``).
    """

    order: torch.Tensor
    start: torch.Tensor
    count: torch.Tensor
    group: torch.Tensor
    block_rows: int

    @classmethod
    def plan(cls, group: torch.Tensor, groups: int | None = None) -> RowBlocks:
        """Blocks for rows assigned to ``group`` (``(R,)`` integers in ``[0, groups)``)."""
        if group.dim() != 1 or group.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"group must be a 1-D integer tensor; got dtype {group.dtype} and shape "
                f"{tuple(group.shape)}"
            )
        device = group.device
        group = group.long()
        counts = torch.bincount(group, minlength=groups or 0)
        present = int((counts > 0).sum())
        # Many rows per group (all queries of a head) get bigger blocks; one row per group
        # (causal prefixes) the smallest block tl.dot takes.
        block_rows = 64 if len(group) >= 64 * max(present, 1) else 16
        blocks = (counts + block_rows - 1) // block_rows
        block_group = torch.repeat_interleave(torch.arange(len(counts), device=device), blocks)
        first_block = torch.cumsum(blocks, 0) - blocks
        within = torch.arange(len(block_group), device=device) - first_block[block_group]
        group_start = torch.cumsum(counts, 0) - counts
        return cls(
            order=torch.argsort(group, stable=True),
            start=group_start[block_group] + within * block_rows,
            count=(counts[block_group] - within * block_rows).clamp_max(block_rows),
            group=block_group,
            block_rows=block_rows,
        )


def _check(name: str, matrices: torch.Tensor, operand: str, tensor: torch.Tensor, width: int):
    check_kernel_operands(name, {"matrices": matrices, operand: tensor}, DTYPES, INTERPRETED)
    if matrices.dim() != 3 or tensor.dim() != 2:
        raise ValueError(
            f"{name}: matrices must be (G, n, k) and {operand} 2-D; got "
            f"{tuple(matrices.shape)} and {tuple(tensor.shape)}"
        )
    if tensor.shape[1] != width:
        raise ValueError(
            f"{name}: {operand} must have {width} columns for matrices of shape "
            f"{tuple(matrices.shape)}; got {tuple(tensor.shape)}"
        )
    check_width(name, "the matrices' width k", matrices.shape[2])


def _launch_rows(kernel, grid_n: bool, matrices, blocks: RowBlocks, source, out, name: str):
    n, k = matrices.shape[1:]
    if len(blocks.order) != len(source):
        raise ValueError(
            f"{name}: the schedule covers {len(blocks.order)} rows; got {len(source)} rows"
        )
    block_k = _pow2(k)
    block_n = _key_block(block_k)
    grid = (len(blocks.group), triton.cdiv(n, block_n)) if grid_n else (len(blocks.group),)
    if len(blocks.group):
        kernel[grid](
            source, matrices, out, blocks.order, blocks.start, blocks.count, blocks.group,
            n, k,
            *source.stride(), *matrices.stride(), *out.stride(),
            BLOCK_R=blocks.block_rows, BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip
    return out


def grouped_right(matrices: torch.Tensor, blocks: RowBlocks, rows: torch.Tensor) -> torch.Tensor:
    """``rows_j @ M_g`` for each row: ``(R, n) -> (R, k)``.

    Args:
        matrices: ``(G, n, k)`` one matrix per group (float32 or float64, any strides).
        blocks: the rows' schedule, from :meth:`RowBlocks.plan` on their groups.
        rows: ``(R, n)`` in ``matrices``' dtype, on its device.
    """
    _check("grouped_right", matrices, "rows", rows, matrices.shape[1])
    out = rows.new_empty(len(rows), matrices.shape[2])
    return _launch_rows(_right_kernel, False, matrices, blocks, rows, out, "grouped_right")


def grouped_left(matrices: torch.Tensor, blocks: RowBlocks, coords: torch.Tensor) -> torch.Tensor:
    """``M_g @ coords_j`` for each row: ``(R, k) -> (R, n)``; arguments as :func:`grouped_right`."""
    _check("grouped_left", matrices, "coords", coords, matrices.shape[2])
    out = coords.new_empty(len(coords), matrices.shape[1])
    return _launch_rows(_left_kernel, True, matrices, blocks, coords, out, "grouped_left")


def grouped_project(matrices: torch.Tensor, blocks: RowBlocks, rows: torch.Tensor) -> torch.Tensor:
    """``(rows_j @ M_g) @ M_g^T`` in one kernel: ``(R, n) -> (R, n)``.

    With ``M_g`` an orthonormal basis of a head's value space this is effective attention
    (``a U U^T``). Arguments as :func:`grouped_right`.
    """
    _check("grouped_project", matrices, "rows", rows, matrices.shape[1])
    out = torch.empty_like(rows, memory_format=torch.contiguous_format)
    return _launch_rows(_project_kernel, False, matrices, blocks, rows, out, "grouped_project")


def _block_pairs(blocks: int, device: torch.device) -> torch.Tensor:
    i, j = torch.triu_indices(blocks, blocks, device=device)
    return torch.stack([i, j], -1).to(torch.int32).contiguous()


def grouped_gram(
    matrices: torch.Tensor, group: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``M_g^T diag(w_j) M_g`` for each row: ``(R, n) -> (R, k, k)``.

    Args:
        matrices: ``(G, n, k)`` one matrix per group (float32 or float64, any strides).
        group: ``(R,)`` each row's group.
        weights: ``(R, n)`` per-row weights on the keys, in ``matrices``' dtype.
    """
    _check("grouped_gram", matrices, "weights", weights, matrices.shape[1])
    if group.shape != (len(weights),):
        raise ValueError(
            f"grouped_gram: group must have shape ({len(weights)},); got {tuple(group.shape)}"
        )
    n, k = matrices.shape[1:]
    out = weights.new_empty(len(weights), k, k)
    block_k = 16 if k <= 16 else 32
    pairs = _block_pairs(triton.cdiv(k, block_k), weights.device)
    if len(weights):
        _gram_kernel[(len(weights), len(pairs))](
            weights, matrices, out, group, pairs,
            n, k,
            *weights.stride(), *matrices.stride(), *out.stride(),
            BLOCK_N=_key_block(block_k), BLOCK_K=block_k,
        )  # fmt: skip
    return out
