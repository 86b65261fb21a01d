"""Per-row reductions over many rows, computed a block of rows at a time.

A reduction such as ``(x * mask).sum(-1)`` over ``(R, n)`` rows first builds ``(R, n)``
temporaries. On a CPU a fresh tensor of tens of megabytes costs more than the arithmetic on it
(each of its pages is faulted in on first touch): for 18,432 x 256 float64 rows on two threads,
``x * mask`` took 26 ms and ``x.sum(-1)`` 0.6 ms. In blocks of rows the temporaries stay small
and in cache, and the allocator hands the same memory back block after block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BLOCK_ENTRIES = 262_144
"""Entries per block of rows (2 MiB of float64 per temporary)."""


def per_row(
    reduce: Callable[..., torch.Tensor], *rows: torch.Tensor, block_entries: int | None = None
) -> torch.Tensor:
    """``reduce(*rows)``, computed on blocks of rows of CPU tensors.

    Args:
        reduce: maps ``(r, n)`` blocks of each tensor to an ``(r, ...)`` result, row by row.
        rows: ``(R, n)`` tensors (the same ``R``).
        block_entries: entries per block (default :data:`BLOCK_ENTRIES`).

    Returns:
        ``(R, ...)``: the same as ``reduce(*rows)``.
    """
    first = rows[0]
    entries = BLOCK_ENTRIES if block_entries is None else block_entries
    if first.device.type != "cpu" or first.numel() <= entries:
        return reduce(*rows)
    size = max(1, entries // max(first.shape[-1], 1))
    blocks = zip(*(tensor.split(size) for tensor in rows), strict=True)
    return torch.cat([reduce(*block) for block in blocks])
