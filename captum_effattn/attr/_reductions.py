"""From projected attention rows to one score per token.

Rows are first averaged over the real query rows of each example (a single row for
``query="auto"``); a registered reduction then combines the selected (layer, head) pairs. Attention
rollout (Abnar & Zuidema, 2020) multiplies full matrices through consecutive layers instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PairReduction = Callable[[torch.Tensor], torch.Tensor]
"""``(B, P, S) -> (B, S)``: combine the per-(layer, head) token scores."""


@dataclass(frozen=True)
class Reduction:
    """A way to combine per-head token scores.

    Attributes:
        name: the registry key (what users pass as ``reduce``).
        combine: see :data:`PairReduction`; ``None`` for rollout, which needs full matrices.
        description: one line for docs and errors.
    """

    name: str
    combine: PairReduction | None
    description: str


REDUCTIONS: dict[str, Reduction] = {
    r.name: r
    for r in (
        Reduction("mean", lambda s: s.mean(1), "mean over the selected layers and heads"),
        Reduction("sum", lambda s: s.sum(1), "sum over the selected layers and heads"),
        Reduction("max", lambda s: s.amax(1), "maximum over the selected layers and heads"),
        Reduction(
            "rollout",
            None,
            "attention rollout: head-averaged matrices with the residual, multiplied through "
            "consecutive layers",
        ),
    )
}
"""The registry of reductions, by name (``reduce=None`` keeps every head instead)."""


def get_reduction(name: str | None) -> Reduction | None:
    if name is None:
        return None
    try:
        return REDUCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"reduce must be one of {(*REDUCTIONS, None)}; got {name!r}") from None


def mean_over_queries(rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(B, P, Q, S) -> (B, P, S)``: average each pair's rows over the real query rows."""
    weights = real.to(rows.dtype)[:, None, :, None]
    return (rows * weights).sum(2) / weights.sum(2).clamp_min(1)


def attention_rollout(matrices: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout through consecutive layers.

    Args:
        matrices: ``(B, L, S, S)`` head-averaged attention of consecutive layers, first layer
            first.
        residual: weight of the identity (the residual stream) mixed into each layer.

    Returns:
        ``(B, S, S)``: ``R = A_L' ... A_1'`` with ``A_l' = (1 - residual) A_l + residual I``;
        row ``i`` says how much each input token flows into position ``i`` at the last layer.
        Distribution rows in give distribution rows out.
    """
    length = matrices.shape[-1]
    identity = torch.eye(length, dtype=matrices.dtype, device=matrices.device)
    flow = identity.expand(matrices.shape[0], length, length)
    for layer in range(matrices.shape[1]):
        flow = ((1 - residual) * matrices[:, layer] + residual * identity) @ flow
    return flow
