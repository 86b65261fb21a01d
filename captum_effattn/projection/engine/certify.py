"""Measure projected rows against their inputs (float64, per row)."""

from __future__ import annotations

import torch

from captum_effattn.projection.engine.grouped import GroupedProducts
from captum_effattn.projection.engine.row_blocks import per_row

ACCEPTED_ERROR = 1e-10
"""Relative head-output error up to which a row from a fast route (the compiled Newton phase of
efficient attention, the normal equations of effective attention) is kept; those routes reach
1e-13 to 1e-12 on the rows they solve, and the others go to the route with orthonormal bases."""


def output_error(values: GroupedProducts, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``||x V - a V|| / ||a V||`` per row (``(R, n)`` rows, per-group ``V``)."""
    reference = values.right(a)
    change = values.right(x - a)
    return change.norm(dim=-1) / reference.norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)


def simplex_violation(x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Largest of ``-min(x)``, ``|sum(x) - 1|`` over real keys, and mass on masked keys."""
    return per_row(_simplex_violation, x, row_mask)


def _simplex_violation(x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    negative = (-x.amin(-1)).clamp_min(0)
    off_sum = ((x * row_mask).sum(-1) - 1).abs()
    masked = (x * ~row_mask).abs().sum(-1)
    return torch.maximum(torch.maximum(negative, off_sum), masked)
