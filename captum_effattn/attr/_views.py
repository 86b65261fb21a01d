"""The three views of an attention row, applied to what a forward pass captured.

A registry maps each view name to a projection with one signature, so adding a view is one entry:

- ``raw``: the attention row itself;
- ``effective``: its orthogonal projection onto the head's value space (Brunner et al., 2020);
- ``efficient``: the minimum-norm distribution with the same head output (this package).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from captum_effattn.attr._queries import QueryRows
from captum_effattn.models import CapturedHeads
from captum_effattn.projection import effective_attention, efficient_attention

Projection = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]
]
"""``(attn (*b, q, n), values (*b, n, d), key_mask (*b, n), causal) -> (rows, output_error)``,
``output_error`` of shape ``(*b, q)``: relative head-output error of each returned row."""


def _raw(attn, values, key_mask, causal):
    return attn, torch.zeros(attn.shape[:-1], dtype=torch.float64, device=attn.device)


def _certified(projection) -> Projection:
    def project(attn, values, key_mask, causal):
        rows, certificate = projection(attn, values, key_mask, causal, return_certificate=True)
        return rows, certificate.output_error

    return project


@dataclass(frozen=True)
class View:
    """One way of reading an attention row.

    Attributes:
        name: the registry key.
        project: see :data:`Projection`.
        distribution: whether the rows it returns are probability distributions.
        solves: whether it solves a problem per row (work worth overlapping with the forward).
    """

    name: str
    project: Projection
    distribution: bool
    solves: bool = True


VIEWS: dict[str, View] = {
    view.name: view
    for view in (
        View("raw", _raw, distribution=True, solves=False),
        View("effective", _certified(effective_attention), distribution=False),
        View("efficient", _certified(efficient_attention), distribution=True),
    )
}
"""The registry of views, by name."""


def get_view(name: str) -> View:
    try:
        return VIEWS[name]
    except (KeyError, TypeError):
        raise ValueError(f"view must be one of {tuple(VIEWS)}; got {name!r}") from None


LayerResult = tuple[torch.Tensor, torch.Tensor]
"""``(rows (B, H_sel, Q, S), output_error (B, H_sel, Q))`` of one layer's projected rows."""


@dataclass(frozen=True)
class ProjectedRows:
    """Projected query rows of every selected head, stacked.

    Attributes:
        rows: ``(B, P, Q, S)``: ``P`` selected (layer, head) pairs in selection order, ``Q``
            query rows per example, ``S`` keys. Zero on padding keys.
        output_error: ``(B, P, Q)`` relative head-output error of each row (0 for raw rows).
        pairs: the ``(layer, head)`` of each index along ``P``.
        queries: which rows were projected.
    """

    rows: torch.Tensor
    output_error: torch.Tensor
    pairs: tuple[tuple[int, int], ...]
    queries: QueryRows


def project_matrices(
    attn: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, causal: bool, view: View
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project every row of full attention matrices; padding query rows come back unchanged.

    Args:
        attn: ``(B, H, S, S)`` attention of ``H`` heads.
        values: ``(B, H, S, d)`` their value vectors.
        key_mask: ``(B, S)`` real tokens.
        causal: row ``i`` sees keys ``<= i`` only.
        view: the view to apply.

    Returns:
        ``(rows, output_error)`` of shapes ``(B, H, S, S)`` and ``(B, H, S)``.

    Raises:
        ValueError: causal attention whose real tokens are not contiguous (padding in between).
    """
    real_queries = key_mask[:, None, :, None]
    starts_with_padding = causal and bool((~key_mask[:, 0] & key_mask.any(-1)).any())
    if not starts_with_padding:
        rows, error = view.project(attn, values, key_mask[:, None], causal)
    else:
        # Left padding under causal attention: the padding rows see no real key at all, so each
        # example is projected on its own real span.
        rows, error = (
            attn.clone(),
            torch.zeros(attn.shape[:-1], dtype=torch.float64, device=attn.device),
        )
        for b, mask in enumerate(key_mask):
            real = mask.nonzero()[:, 0]
            first, last = int(real[0]), int(real[-1]) + 1
            if len(real) != last - first:
                raise ValueError(
                    f"example {b} has padding between real tokens; causal attention rows can "
                    "only be projected when the real tokens are contiguous"
                )
            span = slice(first, last)
            rows[b, :, span, span], error[b, :, span] = view.project(
                attn[b, :, span, span], values[b, :, span], mask[span], causal
            )
    rows = torch.where(real_queries, rows, attn)
    return rows, error.to(attn.device) * key_mask[:, None, :]


def project_layers(
    captured: Sequence[CapturedHeads], queries: QueryRows, view: View
) -> list[LayerResult]:
    """Project the query rows ``queries`` of some captured layers' heads with ``view``, in one
    batch.

    Args:
        captured: selected layers of a single forward pass (any subset, any order).
        queries: the rows to project (:func:`select_query_rows`).
        view: the view to apply.

    Returns:
        Per layer, ``(rows, output_error)`` of shapes ``(B, H_sel, Q, S)`` and ``(B, H_sel, Q)``.
    """
    key_mask, causal = captured[0].key_mask, captured[0].causal
    values = torch.cat([c.values for c in captured], dim=1)
    if queries.all_rows:
        attn = torch.cat([c.attn for c in captured], dim=1)
        rows, error = project_matrices(attn, values, key_mask, causal, view)
    else:
        # Only the explaining rows are ever computed (from the recorded queries and keys).
        rows = torch.cat([c.rows(queries.positions) for c in captured], dim=1)
        # One row per example: causality folds into the key mask (keys up to the query).
        visible = key_mask
        if causal:
            keys = torch.arange(key_mask.shape[-1], device=key_mask.device)
            visible = key_mask & (keys <= queries.positions)
        rows, error = view.project(rows, values, visible[:, None], False)
    sizes = [len(c.heads) for c in captured]
    return list(zip(rows.split(sizes, dim=1), error.split(sizes, dim=1), strict=True))


def stack_layers(
    captured: Sequence[CapturedHeads],
    queries: QueryRows,
    projected: Sequence[LayerResult],
) -> ProjectedRows:
    """Stack the per-layer results of :func:`project_layers` along the heads axis."""
    return ProjectedRows(
        rows=torch.cat([rows for rows, _ in projected], dim=1),
        output_error=torch.cat([error for _, error in projected], dim=1),
        pairs=tuple((c.layer, head) for c in captured for head in c.heads),
        queries=queries,
    )


def project_rows(
    captured: Sequence[CapturedHeads], queries: QueryRows, view: View
) -> ProjectedRows:
    """Project the query rows ``queries`` of every captured head with ``view``.

    Args:
        captured: one :class:`CapturedHeads` per selected layer, from a single forward pass.
        queries: the rows to project (:func:`select_query_rows`).
        view: the view to apply.
    """
    return stack_layers(captured, queries, project_layers(captured, queries, view))
