"""Weightings of attention rows: what each attended key contributes, not only how much it is read.

A weighting multiplies each entry ``x_ij`` of a row (in any view) by a non-negative factor.
:data:`WEIGHTINGS` is the single source of weighting names (``weighting=`` in
:meth:`~captum_effattn.EfficientAttentionAttribution.attribute`); ``None`` leaves rows as they are.

- ``norm`` (Kobayashi et al., EMNLP 2020): the factor of key ``j`` is ``||v_j W_O^h||``, the norm
  of its value vector (bias included) through the head's slice of the output projection, so the
  weighted entry is the size of what key ``j`` adds to the residual stream.
- ``gradient`` (after Chefer et al., ICCV 2021): the factor is ``(d y_target / d A_ij)^+``, the
  positive part of the gradient of the explained logit with respect to the attention weight.
  Since ``d y / d A_ij = (d y / d o_i) . v_j``, it does not depend on the row: every view (which
  reproduces the head output ``o_i``) has the same gradient, read once from the raw attention.

Weighted rows are not renormalized for the ``mean``/``sum``/``max`` reductions (a head whose keys
contribute little weighs less). Rollout needs comparable matrices: see :meth:`Weighting.rollout`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from captum_effattn.attr._queries import QueryRows
from captum_effattn.attr._rollout import attention_rollout, relevance_rollout
from captum_effattn.attr._views import ProjectedRows
from captum_effattn.models import CapturedHeads, ModelArchitecture
from captum_effattn.models.capture import HeadOutputHook
from captum_effattn.projection.engine.rows import gather_rows

WeightFactors = torch.Tensor
"""``(B, H_sel, S_q, S_k)`` or ``(B, H_sel, 1, S_k)`` (the same for every query row): the
non-negative factor of each entry of one layer's selected heads; or ``(B, H_sel, Q, S_k)`` for
the ``Q`` query rows an explanation reads only (see :func:`factors_of_rows`)."""


@dataclass(frozen=True)
class Weighting(ABC):
    """One way of weighting the entries of attention rows.

    Attributes:
        name: the registry key (what users pass as ``weighting``).
        description: one line for docs and error messages.
    """

    name: str
    description: str

    needs_gradient: ClassVar[bool] = False
    """Whether :meth:`factors` needs the gradient of the target with respect to the attention
    (a forward with gradients and one backward pass)."""

    @abstractmethod
    def factors(
        self,
        captured: CapturedHeads,
        architecture: ModelArchitecture,
        gradient: torch.Tensor | None,
    ) -> WeightFactors:
        """The factors of one captured layer (see :data:`WeightFactors`).

        Args:
            captured: the layer's selected heads.
            architecture: the model's architecture (for its output projection).
            gradient: ``(B, H_sel, S_q, S_k)`` gradient of the target with respect to the
                layer's attention, when :attr:`needs_gradient`.
        """

    @abstractmethod
    def rollout(
        self, matrices: torch.Tensor, weighted: torch.Tensor, residual: float
    ) -> torch.Tensor:
        """Propagate weighted matrices through consecutive layers.

        Args:
            matrices: ``(B, L, H, S, S)`` all heads' matrices in the chosen view, first layer
                first.
            weighted: the same, weighted.
            residual: the rollout reduction's residual weight.

        Returns:
            ``(B, S, S)`` flow: row ``i`` holds the score of each token for position ``i``.
        """


@dataclass(frozen=True)
class NormWeighting(Weighting):
    """Key ``j`` weighted by ``||v_j W_O^h||`` (Kobayashi et al., EMNLP 2020)."""

    def factors(
        self,
        captured: CapturedHeads,
        architecture: ModelArchitecture,
        gradient: torch.Tensor | None,
    ) -> WeightFactors:
        slices = architecture.output_projection_slices(captured.layer).detach()
        heads = torch.tensor(captured.heads, device=slices.device)
        return value_norms(captured.values, slices.index_select(0, heads))[:, :, None, :]

    def rollout(
        self, matrices: torch.Tensor, weighted: torch.Tensor, residual: float
    ) -> torch.Tensor:
        """Each weighted row is rescaled to the L1 mass of its unweighted row (1 for the
        distribution views, so rollout multiplies row-stochastic matrices as without a
        weighting), then :func:`~captum_effattn.attr.attention_rollout` runs on the head mean."""
        mass = matrices.abs().sum(-1, keepdim=True)
        weighted_mass = weighted.abs().sum(-1, keepdim=True)
        tiny = torch.finfo(weighted.dtype).tiny
        rescaled = weighted * (mass / weighted_mass.clamp_min(tiny))
        return attention_rollout(rescaled.mean(2), residual)


@dataclass(frozen=True)
class GradientWeighting(Weighting):
    """Entry ``(i, j)`` weighted by ``(d y_target / d A_ij)^+`` (Chefer et al., ICCV 2021)."""

    needs_gradient: ClassVar[bool] = True

    def factors(
        self,
        captured: CapturedHeads,
        architecture: ModelArchitecture,
        gradient: torch.Tensor | None,
    ) -> WeightFactors:
        if gradient is None:
            raise ValueError(f"weighting {self.name!r} needs the gradient of the target")
        return gradient.clamp_min(0)

    def rollout(
        self, matrices: torch.Tensor, weighted: torch.Tensor, residual: float
    ) -> torch.Tensor:
        """Chefer et al.'s propagation ``R <- R + E_h[(grad A * A)^+] R`` from ``R = I``, with the
        chosen view in place of ``A`` (:func:`~captum_effattn.attr._rollout.relevance_rollout`);
        ``residual`` does not apply (the identity is added at full weight), rows are not
        normalized."""
        return relevance_rollout(weighted.clamp_min(0).mean(2))


WEIGHTINGS: dict[str, Weighting] = {
    w.name: w
    for w in (
        NormWeighting(
            "norm",
            "each key scaled by the norm of its value vector through the output projection "
            "(Kobayashi et al., 2020)",
        ),
        GradientWeighting(
            "gradient",
            "each entry scaled by the positive part of the target's gradient with respect to it "
            "(Chefer et al., 2021); class-specific",
        ),
    )
}
"""The registry of weightings, by name (``weighting=None`` weights nothing)."""


def get_weighting(name: str | None) -> Weighting | None:
    """The registered weighting ``name``; ``None`` for ``None``.

    Raises:
        ValueError: no weighting of that name (the message lists the choices, ``None`` too).
    """
    if name is None:
        return None
    try:
        return WEIGHTINGS[name]
    except (KeyError, TypeError):
        raise ValueError(f"weighting must be one of {(*WEIGHTINGS, None)}; got {name!r}") from None


def output_offsets() -> tuple[list[torch.Tensor], HeadOutputHook]:
    """A capture hook for gradients with respect to the head outputs.

    The hook adds a zero tensor that requires grad to each captured layer's head outputs, so the
    gradient with respect to that tensor is the gradient with respect to the outputs, whether or
    not the model's parameters require gradients. The layers keep their fast attention
    (``materialize=False``): no probability matrix is formed or differentiated through.
    :func:`attention_gradient` turns these gradients into gradients with respect to attention.

    Returns:
        The list the zero tensors are appended to (one per captured layer, in order) and the
        hook to pass as ``on_output`` to :func:`~captum_effattn.models.capture_attention`.

    Raises:
        RuntimeError: under ``torch.inference_mode()``, which forbids the backward pass.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "weighting='gradient' runs a backward pass, which torch.inference_mode() forbids: "
            "call attribute outside inference mode (torch.no_grad() is fine)"
        )
    offsets: list[torch.Tensor] = []

    def add_offset(captured: CapturedHeads, outputs: torch.Tensor) -> torch.Tensor:
        offsets.append(torch.zeros_like(outputs, requires_grad=True))
        return outputs + offsets[-1]

    return offsets, add_offset


def attention_gradient(
    captured: CapturedHeads, output_gradient: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, H_sel, S_q, S_k)`` gradient with respect to the selected heads' attention, or
    ``(B, H_sel, Q, S_k)`` for the query rows ``positions`` only.

    The head output is ``o_i = sum_j A_ij v_j``, so ``d y / d A_ij = (d y / d o_i) . v_j``
    for every entry, masked or not (masked entries multiply rows that are zero there).

    Args:
        captured: the layer's selected heads (their values, one per selected head).
        output_gradient: ``(B, H, S_q, d)`` gradient with respect to every head's output.
        positions: ``(B, Q)`` query rows to compute (default: every row). The rows an
            explanation reads are all it needs: every row of MiniLM's six layers at 8 x 512
            tokens is 1.2 GB of gradients and factors, freshly paged in on every call.
    """
    heads = torch.tensor(captured.heads, device=output_gradient.device)
    selected = output_gradient.index_select(1, heads)
    if positions is not None:
        selected = gather_rows(selected, positions)
    return selected @ captured.values.to(selected.dtype).mT


def value_norms(values: torch.Tensor, output_slices: torch.Tensor) -> torch.Tensor:
    """``||v_j W_O^h||`` of every key of every head.

    Args:
        values: ``(B, H, S, d)`` value vectors, bias included.
        output_slices: ``(H, d, E)`` each head's slice of the output projection.

    Returns:
        ``(B, H, S)`` norms, in ``values``' dtype.
    """
    through = torch.einsum("bhsd,hde->bhse", values, output_slices.to(values.dtype))
    return through.norm(dim=-1)


def factors_of_rows(
    factors: Sequence[WeightFactors], queries: QueryRows, per_query: bool = False
) -> torch.Tensor:
    """``(B, P, Q, S)``: the factors of the query rows ``queries``, layers stacked along the heads
    axis (as :class:`~captum_effattn.attr._views.ProjectedRows`); with ``per_query`` the
    factors were computed for those rows only (``(B, H_sel, Q, S)``, in their order)."""
    rows = []
    for layer in factors:
        if layer.shape[2] == 1 or per_query:
            rows.append(layer.expand(-1, -1, queries.positions.shape[1], -1))
        else:
            rows.append(gather_rows(layer, queries.positions))
    return torch.cat(rows, dim=1)


def weight_rows(
    projected: ProjectedRows, factors: Sequence[WeightFactors], per_query: bool = False
) -> ProjectedRows:
    """``projected`` with every row multiplied by its factors (one entry of ``factors`` per
    layer, in the order of ``projected.pairs``; ``per_query``: as in :func:`factors_of_rows`)."""
    weights = factors_of_rows(factors, projected.queries, per_query).to(projected.rows.dtype)
    return replace(projected, rows=projected.rows * weights)


def weight_matrices(matrices: torch.Tensor, factors: Sequence[WeightFactors]) -> torch.Tensor:
    """``(B, L, H, S, S)`` full matrices times their ``(B, H, S|1, S)`` per-layer factors."""
    return matrices * torch.stack(
        [f.expand(-1, -1, matrices.shape[-2], -1) for f in factors], dim=1
    ).to(matrices.dtype)
