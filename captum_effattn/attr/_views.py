"""The views of an attention row, applied to what a forward pass captured.

:data:`VIEWS` is the single source of view names: every list of views in the package (the
``view=`` choices, :func:`~captum_effattn.metrics.standard_methods`, the demo) is read from it, so
adding a view is one :func:`register_view` call:

- ``raw``: the attention row itself;
- ``effective``: its orthogonal projection onto the head's value space (Brunner et al., 2020);
- ``efficient``: the minimum-norm distribution with the same head output (this package);
- ``minimal``: a vertex of the valid rows, at most ``rank([1, V])`` keys (this package).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from captum_effattn.attr._queries import QueryRows
from captum_effattn.models import CapturedHeads
from captum_effattn.models.capture import rows_of_layers
from captum_effattn.models.carryover import thread_scratch
from captum_effattn.projection import (
    effective_attention,
    efficient_attention,
    minimal_attention,
)
from captum_effattn.projection.engine.threads import threads_for


class Projection(Protocol):
    """``(attn (*b, q, n), values (*b, n, d), key_mask (*b, n), causal, **options) -> (rows,
    output_error)``: ``rows`` of ``attn``'s shape and ``output_error`` of shape ``(*b, q)``, the
    relative head-output error of each returned row."""

    def __call__(
        self,
        attn: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor,
        causal: bool,
        **options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _raw(
    attn: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, causal: bool, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    # Takes no options (View.options is empty): the keyword catch-all only fits the protocol.
    return attn, torch.zeros(attn.shape[:-1], dtype=torch.float64, device=attn.device)


def _certified(projection: Any) -> Projection:
    """A projection function of :mod:`captum_effattn.projection`, returning its certificate's
    head-output error with the rows."""

    def project(
        attn: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor,
        causal: bool,
        **options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, certificate = projection(
            attn, values, key_mask, causal, return_certificate=True, **options
        )
        return rows, certificate.output_error

    return project


@dataclass(frozen=True)
class View:
    """One way of reading an attention row.

    Attributes:
        name: the registry key (what users pass as ``view``).
        project: see :class:`Projection`.
        distribution: whether the rows it returns are probability distributions.
        solves: whether it solves a problem per row (work worth overlapping with the forward).
        description: one line for docs and error messages.
        options: the keyword options ``project`` accepts beyond the four tensors (see
            :meth:`with_options`); empty for the built-in views.
    """

    name: str
    project: Projection
    distribution: bool
    solves: bool = True
    description: str = ""
    options: tuple[str, ...] = ()

    @property
    def method_name(self) -> str:
        """How comparisons and the demo label this view as an attribution method."""
        return f"{self.name} attention"

    def with_options(self, **options: Any) -> View:
        """This view with ``options`` bound into its projection (``None`` values are left out).

        Raises:
            ValueError: an option this view does not take (the message lists the ones it does).
        """
        given = {key: value for key, value in options.items() if value is not None}
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(
                f"view {self.name!r} takes no option {unknown[0]!r}; its options: {self.options}"
            )
        if not given:
            return self
        return replace(self, project=functools.partial(self.project, **given))


VIEWS: dict[str, View] = {}
"""The registry of views, by name, in the order they are shown (:func:`register_view`)."""


def register_view(view: View) -> View:
    """Add ``view`` to :data:`VIEWS`; every list of views in the package then includes it.

    Raises:
        ValueError: a view of that name is already registered.
    """
    if view.name in VIEWS:
        raise ValueError(f"a view named {view.name!r} is already registered")
    VIEWS[view.name] = view
    return view


register_view(
    View("raw", _raw, distribution=True, solves=False, description="attention as computed")
)
register_view(
    View(
        "effective",
        _certified(effective_attention),
        distribution=False,
        description="orthogonal projection onto the value space (Brunner et al., 2020); not a "
        "distribution",
    )
)
register_view(
    View(
        "efficient",
        _certified(efficient_attention),
        distribution=True,
        description="minimum-norm distribution with the same head output",
    )
)
register_view(
    View(
        "minimal",
        _certified(minimal_attention),
        distribution=True,
        description="distribution with the same head output on as few keys as the value space "
        "allows (a vertex of the valid rows)",
    )
)


def view_names() -> tuple[str, ...]:
    """The registered view names, in registry order."""
    return tuple(VIEWS)


def get_view(name: str) -> View:
    """The registered view ``name``.

    Raises:
        ValueError: no view of that name (the message lists the registered ones).
    """
    try:
        return VIEWS[name]
    except (KeyError, TypeError):
        raise ValueError(f"view must be one of {view_names()}; got {name!r}") from None


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


def project_with_row_masks(
    attn: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, view: View
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project rows whose valid sets differ row by row (sliding windows): each row on its own.

    Args:
        attn: ``(B, H, Q, S)`` attention rows.
        values: ``(B, H, S, d)`` their value vectors.
        visible: ``(B, Q, S)`` the keys each row sees (padding, causality and window together);
            row ``q`` is projected within the value space of its visible keys.
        view: the view to apply.

    Returns:
        ``(rows, output_error)`` of shapes ``(B, H, Q, S)`` and ``(B, H, Q)``; a row that sees no
        key (a padding query) comes back unchanged with error 0.
    """
    seen = visible.any(-1)[:, None, :, None]  # (B, 1, Q, 1)
    # A row that sees nothing is given every key and a uniform row (projected, then discarded).
    masks = visible | ~seen[:, 0]
    rows_in = torch.where(seen, attn, torch.full_like(attn, 1 / attn.shape[-1]))
    rows, error = view.project(rows_in[..., None, :], values[:, :, None], masks[:, None], False)
    rows, error = rows[..., 0, :], error[..., 0]
    return torch.where(seen, rows, attn), error.to(attn.device) * seen[..., 0]


def project_captured(captured: CapturedHeads, view: View) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of one captured layer's selected heads in ``view``, each row within the keys it
    sees (its causal prefix, its sliding window); as :func:`project_matrices` returns them."""
    if captured.window is None:
        return project_matrices(
            captured.attn, captured.values, captured.key_mask, captured.causal, view
        )
    every_row = torch.arange(captured.attn.shape[-2], device=captured.attn.device)
    rows, error = project_with_row_masks(
        captured.attn, captured.values, captured.visible_keys(every_row), view
    )
    real_queries = captured.key_mask[:, None, :, None]
    return torch.where(real_queries, rows, captured.attn), error * captured.key_mask[:, None, :]


def _project_layer_alone(captured: CapturedHeads, queries: QueryRows, view: View) -> LayerResult:
    if queries.all_rows:
        return project_captured(captured, view)
    rows = captured.rows(queries.positions)
    return project_with_row_masks(
        rows, captured.values, captured.visible_keys(queries.positions), view
    )


# Layers are projected together (one call: one validation, one layout, one parallel solve) while
# the tensors concatenated for them stay under glibc's largest mmap threshold: a larger buffer is
# mapped afresh on every call and paid for in page faults (MiniLM's 72 heads at 8 x 512 tokens:
# 38 MB of values took 14 ms to concatenate; in two runs of three layers the projection took
# 0.925x the time of one run of six, 30 interleaved rounds, one or two threads).
TOGETHER_BYTES = 32 * 2**20


def project_layers(
    captured: Sequence[CapturedHeads], queries: QueryRows, view: View
) -> list[LayerResult]:
    """Project the query rows ``queries`` of some captured layers' heads with ``view``: in one
    batch, or in as few runs of consecutive layers, of equal numbers, as
    :data:`TOGETHER_BYTES` allows.

    Args:
        captured: selected layers of a single forward pass (any subset, any order).
        queries: the rows to project (:func:`select_query_rows`).
        view: the view to apply.

    Returns:
        Per layer, ``(rows, output_error)`` of shapes ``(B, H_sel, Q, S)`` and ``(B, H_sel, Q)``.
    """
    if any(c.window is not None for c in captured) or len({c.causal for c in captured}) > 1:
        # Sliding windows (each row has its own valid set) or encoder and decoder layers
        # together: each layer is projected on its own, with the keys its rows see.
        return [_project_layer_alone(c, queries, view) for c in captured]
    total = sum(_concatenated_bytes(c, queries) for c in captured)
    runs = max(1, min(len(captured), -(-total // TOGETHER_BYTES)))
    per_run = max(1, -(-len(captured) // runs))
    return [
        result
        for start in range(0, len(captured), per_run)
        for result in _project_together(captured[start : start + per_run], queries, view)
    ]


def _concatenated_bytes(captured: CapturedHeads, queries: QueryRows) -> int:
    """Bytes of the layer's tensors that :func:`_project_together` concatenates (from shapes: its
    attention may not be computed yet)."""
    batch, heads, keys, width = captured.values.shape
    columns = width + (captured.query_count * keys if queries.all_rows else 0)
    return batch * heads * keys * columns * captured.values.element_size()


def _project_together(
    captured: Sequence[CapturedHeads], queries: QueryRows, view: View
) -> list[LayerResult]:
    """:func:`project_layers` for layers of one kind (no windows), in one batch.

    A small batch (the [CLS] rows of a few examples) runs its PyTorch operations on one thread:
    each is a few microseconds of arithmetic, and handing it to PyTorch's second thread cost
    tens (MiniLM's six [CLS] rows at n = 128 took 0.88 ms on two threads and 0.29 ms on one; the
    concatenated values 0.41 and 0.05 ms). The compiled solver still runs on the caller's threads.
    """
    key_mask = captured[0].key_mask
    batch, keys = key_mask.shape
    rows_per_example = captured[0].query_count if queries.all_rows else queries.positions.shape[-1]
    width = max(c.values.shape[-1] for c in captured) + 1
    work = batch * sum(len(c.heads) for c in captured) * rows_per_example * keys * width
    with threads_for(work, key_mask.device):
        return _project_together_here(captured, queries, view)


def _project_together_here(
    captured: Sequence[CapturedHeads], queries: QueryRows, view: View
) -> list[LayerResult]:
    key_mask, causal = captured[0].key_mask, captured[0].causal
    values = _concatenated_values(captured)
    if queries.all_rows:
        attn = torch.cat([c.attn for c in captured], dim=1)
        rows, error = project_matrices(attn, values, key_mask, causal, view)
    else:
        # Only the explaining rows are ever computed (from the recorded queries and keys).
        rows = rows_of_layers(captured, queries.positions)
        # One row per example: causality folds into the key mask (keys up to the query).
        visible = key_mask
        if causal:
            keys = torch.arange(key_mask.shape[-1], device=key_mask.device)
            visible = key_mask & (keys <= queries.positions)
        rows, error = view.project(rows, values, visible[:, None], False)
    sizes = [len(c.heads) for c in captured]
    return list(zip(rows.split(sizes, dim=1), error.split(sizes, dim=1), strict=True))


def _concatenated_values(captured: Sequence[CapturedHeads]) -> torch.Tensor:
    """Every layer's values, heads stacked: ``(B, sum of H_sel, S, d)``, contiguous.

    Written into memory this thread reuses from call to call (:func:`thread_scratch`), not a new
    tensor: a fresh one of a few MiB is faulted in page by page wherever glibc handed the last
    one back to the system (about 1,000 faults a call at batch 1, n = 512). Nothing keeps it: the
    projection reads it and returns rows and errors of its own.
    """
    parts = [c.values for c in captured]
    batch, _, keys, width = parts[0].shape
    dtype, out = parts[0].dtype, None
    if all(p.dtype == dtype and not p.requires_grad for p in parts):
        heads = sum(p.shape[1] for p in parts)
        out = thread_scratch((batch, heads, keys, width), dtype, parts[0].device)
    return torch.cat(parts, dim=1) if out is None else torch.cat(parts, dim=1, out=out)


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


def project_captured_matrices(
    captured: Sequence[CapturedHeads], view: View
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of every captured layer's full matrices in ``view``.

    Args:
        captured: one :class:`CapturedHeads` per selected layer, the same heads in each.
        view: the view to apply.

    Returns:
        ``(B, L, H, S, S)`` projected matrices and ``(B, L, H, S)`` relative head-output errors.
    """
    projected = [project_captured(c, view) for c in captured]
    return torch.stack([p[0] for p in projected], 1), torch.stack([p[1] for p in projected], 1)
