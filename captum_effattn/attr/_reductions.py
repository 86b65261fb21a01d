"""From projected attention rows to one score per token.

Every reduction is a :class:`Reduction`: it checks the head selection it is given, then turns what
a forward pass captured (an :class:`AttentionReading`) into ``(B, S)`` token scores and their
``(B,)`` head-output error. Two kinds are registered in :data:`REDUCTIONS`:

- :class:`PairReduction` (``mean``, ``sum``, ``max``): the explaining query rows are averaged over
  the real query rows of each example (a single row for ``query="auto"``), then ``combine``
  merges the selected (layer, head) pairs;
- :class:`RolloutReduction` (``rollout``, Abnar & Zuidema, 2020): full head-averaged matrices are
  multiplied through consecutive layers.

``reduce=None`` is not a reduction: it keeps the (layer, head) axis (see
:meth:`EfficientAttentionAttribution.attribute`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from captum_effattn.attr._queries import QueryRows
from captum_effattn.attr._rollout import attention_rollout
from captum_effattn.attr._views import (
    ProjectedRows,
    View,
    project_captured_matrices,
    project_rows,
)
from captum_effattn.attr._weightings import (
    WeightFactors,
    Weighting,
    weight_matrices,
    weight_rows,
)
from captum_effattn.models import CapturedHeads, HeadSelection

PairCombine = Callable[[torch.Tensor], torch.Tensor]
"""``(B, P, S) -> (B, S)``: combine the per-(layer, head) token scores."""


@dataclass(frozen=True)
class AttentionReading:
    """What one forward pass gave a reduction.

    Attributes:
        captured: one :class:`CapturedHeads` per selected layer.
        queries: the explaining query rows, resolved on the real tokens.
        projected: those rows in the requested view, when they were projected during the forward
            (``None`` when the reduction reads full matrices).
        weighting: the weighting of the rows (``None``: rows as they are).
        factors: with a weighting, its factors for each captured layer.
        factors_per_query: the factors cover the query rows only (``(B, H_sel, Q, S)``, in the
            order of ``queries``), not every row.
    """

    captured: Sequence[CapturedHeads]
    queries: QueryRows
    projected: ProjectedRows | None = None
    weighting: Weighting | None = None
    factors: Sequence[WeightFactors] = ()
    factors_per_query: bool = False

    def weighted(self, projected: ProjectedRows) -> ProjectedRows:
        """``projected`` (rows of this reading) with the weighting applied."""
        if self.weighting is None:
            return projected
        return weight_rows(projected, self.factors, self.factors_per_query)

    @property
    def key_mask(self) -> torch.Tensor:
        """``(B, S)`` real tokens."""
        return self.captured[0].key_mask


@dataclass(frozen=True)
class Reduction(ABC):
    """A way to turn the selected heads' attention into one score per token.

    Attributes:
        name: the registry key (what users pass as ``reduce``).
        description: one line for docs and errors.
    """

    name: str
    description: str

    reads_full_matrices: ClassVar[bool] = False
    """Whether it needs every row of the selected heads (then no rows are projected during the
    forward pass)."""

    def check_selection(self, selection: HeadSelection) -> None:  # noqa: B027 (optional hook)
        """Raise ``ValueError`` when ``selection`` does not suit this reduction."""

    @abstractmethod
    def reduce(self, reading: AttentionReading, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (B, S), output_error (B,))`` for the captured heads read in ``view``."""


@dataclass(frozen=True)
class PairReduction(Reduction):
    """Average each (layer, head) pair's explaining rows, then ``combine`` the pairs.

    Attributes:
        combine: see :data:`PairCombine`.
    """

    combine: PairCombine

    def reduce(self, reading: AttentionReading, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        projected = reading.projected
        if projected is None:
            projected = project_rows(reading.captured, reading.queries, view)
        per_head, error = per_head_scores(reading.weighted(projected), reading.queries)
        return self.combine(per_head), error


@dataclass(frozen=True)
class RolloutReduction(Reduction):
    """Attention rollout through the selected consecutive layers (:func:`attention_rollout`);
    with a weighting, its :meth:`~captum_effattn.attr._weightings.Weighting.rollout`.

    Attributes:
        residual: weight of the identity (the residual stream) mixed into each layer.
    """

    residual: float = 0.5
    reads_full_matrices: ClassVar[bool] = True

    def check_selection(self, selection: HeadSelection) -> None:
        if not selection.all_heads_of_consecutive_layers:
            chosen = dict(selection.items())
            raise ValueError(
                f"reduce={self.name!r} multiplies attention through consecutive layers and needs "
                f"all heads of each of them (all rows of every matrix); got {chosen}"
            )

    def reduce(self, reading: AttentionReading, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        matrices, errors = project_captured_matrices(reading.captured, view)
        full = matrices.double()
        if reading.weighting is None:
            flow = attention_rollout(full.mean(2), self.residual)
        else:
            weighted = weight_matrices(full, reading.factors)
            flow = reading.weighting.rollout(full, weighted, self.residual)
        positions = reading.queries.positions
        rows = flow.gather(1, positions[..., None].expand(-1, -1, flow.shape[-1]))[:, None]
        scores = mean_over_queries(rows, reading.queries.real)[:, 0]
        # Padding gets exactly 0 whatever the view returned on padding rows.
        scores = (scores * reading.key_mask).to(matrices.dtype)
        return scores, per_example_max(errors * reading.key_mask[:, None, None, :])


REDUCTIONS: dict[str, Reduction] = {
    r.name: r
    for r in (
        PairReduction("mean", "mean over the selected layers and heads", lambda s: s.mean(1)),
        PairReduction("sum", "sum over the selected layers and heads", lambda s: s.sum(1)),
        PairReduction("max", "maximum over the selected layers and heads", lambda s: s.amax(1)),
        RolloutReduction(
            "rollout",
            "attention rollout: head-averaged matrices with the residual, multiplied through "
            "consecutive layers",
        ),
    )
}
"""The registry of reductions, by name (``reduce=None`` keeps every head instead)."""


def get_reduction(name: str) -> Reduction:
    """The registered reduction ``name``.

    Raises:
        ValueError: no reduction of that name (the message lists the choices, ``None`` too).
    """
    try:
        return REDUCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"reduce must be one of {(*REDUCTIONS, None)}; got {name!r}") from None


def per_example_max(errors: torch.Tensor) -> torch.Tensor:
    """``(B, ...) -> (B,)``: the largest error of each example."""
    return errors.reshape(errors.shape[0], -1).amax(-1)


def mean_over_queries(rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(B, P, Q, S) -> (B, P, S)``: average each pair's rows over the real query rows."""
    weights = real.to(rows.dtype)[:, None, :, None]
    return (rows * weights).sum(2) / weights.sum(2).clamp_min(1)


def per_head_scores(
    projected: ProjectedRows, queries: QueryRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, P, S)`` token scores of each (layer, head) pair and the ``(B,)`` largest relative
    head-output error of the real query rows."""
    per_head = mean_over_queries(projected.rows, queries.real)
    return per_head, per_example_max(projected.output_error * queries.real[:, None, :])
