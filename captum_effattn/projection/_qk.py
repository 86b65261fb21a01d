"""Selected attention rows from queries and keys: input checks and the PyTorch implementation.

Only the requested query rows are computed, in chunks of rows, so a fixed number of rows costs
memory linear in the number of keys ``n``: the ``(n, n)`` matrix of a head is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from captum_effattn._typing import KeyMask
from captum_effattn.projection._checks import (
    _require_finite,
    _require_float_tensor,
    _where,
    check_key_mask,
)

# Scores and probabilities of one chunk of rows stay below this many bytes.
ROWS_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class QKProblem:
    """Validated inputs with the leading dimensions flattened to one batch dimension ``B``."""

    query: torch.Tensor  # (B, H_q, n_q, d_k)
    key: torch.Tensor  # (B, H_kv, n, d_k)
    values: torch.Tensor | None  # (B, H_kv, n, d_v)
    key_mask: KeyMask | None  # (B, n) bool, None when every key is real
    rows: torch.Tensor  # (r,) int64 query positions in [0, n_q)
    scale: float
    batch_shape: torch.Size

    def unflatten(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, ...)`` back to ``(*batch, ...)``."""
        return tensor.reshape(*self.batch_shape, *tensor.shape[1:])


def _heads_tensor(name: str, tensor: object, shape_hint: str) -> torch.Tensor:
    tensor = _require_float_tensor(name, tensor, shape_hint)
    if tensor.dim() < 3:
        raise ValueError(
            f"{name} must have shape {shape_hint} (at least 3 dimensions); got shape "
            f"{tuple(tensor.shape)}"
        )
    return tensor


def _query_rows(rows: int | Sequence[int] | torch.Tensor | None, n_q: int, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(n_q, device=device)
    index = torch.as_tensor(rows, device=device)
    if index.dim() == 0:
        index = index[None]
    if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(
            f"rows must be an int, a sequence of ints or a 1-D integer tensor of query positions; "
            f"got {rows!r}"
        )
    outside = (index < -n_q) | (index >= n_q)
    if outside.any():
        raise ValueError(
            f"rows must be query positions in [-{n_q}, {n_q}) (n_q = {n_q} queries); got "
            f"{int(index[outside][0])}"
        )
    return index.long() % n_q


def check_qk_inputs(
    query: object,
    key: object,
    values: object | None,
    key_mask: object | None,
    causal: bool,
    rows: int | Sequence[int] | torch.Tensor | None,
    scaling: float | None,
) -> QKProblem:
    """Check shapes, dtypes, devices, finiteness and rows; flatten the batch dimensions.

    Raises:
        TypeError: a non-tensor or non-floating-point input, query and key of different dtypes,
            or rows that are not integers.
        ValueError: shapes that do not fit, query heads not a multiple of key heads, leading
            dimensions that do not broadcast, tensors on different devices, NaN or inf, causal
            with ``n_q != n``, rows out of range, a non-finite scaling, or a requested row that
            sees no real key.
    """
    query = _heads_tensor("query", query, "(*batch, H_q, n_q, d_k)")
    key = _heads_tensor("key", key, "(*batch, H_kv, n, d_k)")
    heads, n_q, d_k = query.shape[-3:]
    kv_heads, n = key.shape[-3:-1]
    if key.shape[-1] != d_k:
        raise ValueError(
            f"key must have shape (*batch, H_kv, n, d_k) with d_k = {d_k} as query (shape "
            f"{tuple(query.shape)}) has; got key of shape {tuple(key.shape)}"
        )
    if heads % kv_heads:
        raise ValueError(
            f"query has {heads} heads and key {kv_heads}: grouped-query attention needs the "
            "query heads to be a multiple of the key heads"
        )
    if key.dtype != query.dtype:
        raise TypeError(f"query and key must share one dtype; got {query.dtype} and {key.dtype}")
    for name, tensor in (("key", key), ("values", values)):
        if isinstance(tensor, torch.Tensor) and tensor.device != query.device:
            raise ValueError(f"query is on {query.device} but {name} is on {tensor.device}")
    shapes = [query.shape[:-3], key.shape[:-3]]
    if values is not None:
        values = _heads_tensor("values", values, "(*batch, H_kv, n, d_v)")
        if values.shape[-3:-1] != (kv_heads, n):
            raise ValueError(
                f"values must have shape (*batch, H_kv, n, d_v) with H_kv = {kv_heads} heads and "
                f"n = {n} keys, as key (shape {tuple(key.shape)}) has; got values of shape "
                f"{tuple(values.shape)}"
            )
        shapes.append(values.shape[:-3])
    if key_mask is not None:
        key_mask = check_key_mask(key_mask, n, "query", query.device)
        shapes.append(key_mask.shape[:-1])
    try:
        batch_shape = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(
            "leading (batch) dimensions do not broadcast: "
            + ", ".join(
                f"{name} has {tuple(shape)}"
                for name, shape in zip(("query", "key", "values", "key_mask"), shapes, strict=False)
            )
        ) from None
    if causal and n_q != n:
        raise ValueError(
            f"causal=True needs one query per key (n_q == n), since query i attends to keys <= i; "
            f"got n_q = {n_q} queries over n = {n} keys"
        )
    scale = 1 / math.sqrt(d_k) if scaling is None else float(scaling)
    if not math.isfinite(scale):
        raise ValueError(f"scaling must be a finite number; got {scaling!r}")
    _require_finite("query", query)
    _require_finite("key", key)
    if values is not None:
        _require_finite("values", values)
    index = _query_rows(rows, n_q, query.device)
    size = math.prod(batch_shape)

    def flat(tensor: torch.Tensor, tail: int) -> torch.Tensor:
        trailing = tensor.shape[-tail:]
        return tensor.expand(*batch_shape, *trailing).reshape(size, *trailing)

    if key_mask is not None:
        key_mask = flat(key_mask, 1)
        _require_visible_keys(key_mask, index, causal, batch_shape)
    return QKProblem(
        query=flat(query, 3),
        key=flat(key, 3),
        values=None if values is None else flat(values, 3),
        key_mask=key_mask,
        rows=index,
        scale=scale,
        batch_shape=batch_shape,
    )


def _require_visible_keys(
    key_mask: torch.Tensor, rows: torch.Tensor, causal: bool, batch_shape: torch.Size
) -> None:
    """Every requested row must see a real key (a causal row sees keys up to its position)."""
    n = key_mask.shape[-1]
    first_real = torch.where(key_mask.any(-1), key_mask.int().argmax(-1), n)
    last_visible = rows if causal else torch.full_like(rows, n - 1)
    blind = first_real[:, None] > last_visible[None, :]
    if blind.any():
        example, slot = (int(i) for i in blind.nonzero()[0])
        index = torch.unravel_index(torch.tensor(example), batch_shape)
        where = _where(tuple(int(i) for i in index))
        position = int(rows[slot])
        seen = f"keys 0..{position} are" if causal else "every key is"
        raise ValueError(
            f"query row {position} of the example at batch index {where} sees no real key "
            f"({seen} masked): its attention is undefined"
        )


def attention_rows_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    key_mask: KeyMask | None,
    rows: torch.Tensor,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Selected rows of ``softmax(Q K^T * scale + mask)`` in PyTorch, chunked over rows.

    Args and returns as :func:`captum_effattn.kernels.attention.attention_rows_triton`: query
    ``(B, H_q, n_q, d_k)``, key ``(B, H_kv, n, d_k)``, key_mask ``(B, n)`` or ``None``, rows
    ``(r,)``; returns ``(B, H_q, r, n)`` in float32 (float64 for float64 inputs).
    """
    batch, heads, _, d_k = query.shape
    kv_heads, n = key.shape[1:3]
    group = heads // kv_heads
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    keys = key.to(work)[:, :, None]  # (B, H_kv, 1, n, d_k): shared by the group's query heads
    out = torch.empty(batch, heads, len(rows), n, dtype=work, device=query.device)
    grouped = out.view(batch, kv_heads, group, len(rows), n)
    visible = torch.ones(1, n, dtype=torch.bool, device=query.device)
    if key_mask is not None:
        visible = key_mask[:, None, None, None, :]  # (B, 1, 1, 1, n)
    positions = torch.arange(n, device=query.device)
    # Scores and probabilities of a chunk: two (B, H_q, rows, n) tensors.
    step = max(1, ROWS_CHUNK_BYTES // (2 * batch * heads * n * out.element_size()))
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        q = query[:, :, chunk].to(work).view(batch, kv_heads, group, len(chunk), d_k)
        scores = (q @ keys.mT) * scale
        mask = visible & (positions <= chunk[:, None]) if causal else visible
        grouped[..., start : start + step, :] = scores.masked_fill(~mask, -torch.inf).softmax(-1)
    return out
