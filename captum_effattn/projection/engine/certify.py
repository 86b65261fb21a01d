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


def distribution_terms(x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """``(R, 3)`` for ``(R, n)`` rows: each row's smallest entry, its mass on masked keys, and its
    sum over real keys (computed a block of rows at a time)."""
    return per_row(_distribution_terms, x, row_mask)


def _distribution_terms(x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    masked = (x * ~row_mask).abs().sum(-1)
    return torch.stack((x.amin(-1), masked, (x * row_mask).sum(-1)), -1)


def simplex_violation(x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Largest of ``-min(x)``, ``|sum(x) - 1|`` over real keys, and mass on masked keys."""
    smallest, masked, total = distribution_terms(x, row_mask).unbind(-1)
    negative = (-smallest).clamp_min(0)
    return torch.maximum(torch.maximum(negative, (total - 1).abs()), masked)
