"""From user tensors ``(*batch, q, n)`` to flat rows grouped by the value space they project onto.

Every attention row is projected onto a space spanned by (some of) the value vectors of its head.
Rows that share that space — all rows of one head, the query heads of one grouped-query value
head, or in the causal case the rows with the same prefix — form a *group* and share one basis, so
the solver's products become a few large batched matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from captum_effattn._typing import FlatRows, KeyMask, ValueVectors
from captum_effattn.projection.engine.validation import CheckedInputs

# Upper bound on the float64 working set of one chunk (bases, outer products, solver state).
CHUNK_BYTES = 256 * 2**20


def group_bytes(keys: int, rows: int, rank_width: int) -> int:
    """The working set a group of ``rows`` rows over ``keys`` keys counts against
    :data:`CHUNK_BYTES`, for bases of ``rank_width`` columns."""
    return 8 * keys * (rank_width * rank_width + 3 * rank_width) + 8 * rows * keys * 16


@dataclass(frozen=True)
class Chunk:
    """A set of groups solved together, trimmed to the keys any of them can see."""

    row_ids: torch.Tensor  # (R_c,) positions in the flat row list
    rows: FlatRows  # (R_c, n_c) float64
    group: torch.Tensor  # (R_c,) group of each row, local to the chunk
    values: ValueVectors  # (G_c, n_c, d) float64
    key_mask: KeyMask  # (G_c, n_c) bool, the keys each group may use

    def subset(self, rows: torch.Tensor) -> Chunk:
        """The chunk of ``rows`` (indices into this chunk's rows) and the groups they use."""
        used, group = torch.unique(self.group[rows], return_inverse=True)
        return Chunk(
            row_ids=self.row_ids[rows],
            rows=self.rows[rows],
            group=group,
            values=self.values[used],
            key_mask=self.key_mask[used],
        )


@dataclass(frozen=True)
class RowLayout:
    """Flat view of a batch of projection problems."""

    batch_shape: torch.Size
    q: int
    n: int
    rows: FlatRows  # (R, n) float64, R = prod(batch_shape) * q
    row_group: torch.Tensor  # (R,)
    # (S, n, d) as given (any dtype): one per distinct (values, key_mask) pair. Chunks get them
    # in float64 divided by :attr:`source_scale` (:meth:`unit_values`), each chunk its own copy.
    source_values: torch.Tensor
    source_mask: torch.Tensor  # (S, n) bool
    group_source: torch.Tensor  # (G,)
    group_prefix: torch.Tensor  # (G,) a group may use keys j < prefix (n when not causal)

    @property
    def out_shape(self) -> torch.Size:
        return torch.Size((*self.batch_shape, self.q, self.n))

    @cached_property
    def source_scale(self) -> torch.Tensor:
        """``(S,)`` float64: each source's largest magnitude on real keys (computed when a chunk
        first needs it: rows a compiled route solves from the values as given never do)."""
        return _scale(self.source_values, self.source_mask)

    def subset(self, row_ids: torch.Tensor) -> RowLayout:
        """The layout of the flat rows ``row_ids`` only, with just the groups they use (the
        sources are shared); its flat row ``i`` is this layout's row ``row_ids[i]``."""
        used, row_group = torch.unique(self.row_group[row_ids], return_inverse=True)
        return replace(
            self,
            rows=self.rows[row_ids],
            row_group=row_group,
            group_source=self.group_source[used],
            group_prefix=self.group_prefix[used],
        )

    def row_index(self, flat: int) -> tuple[int, ...]:
        """The index in the (broadcast) attention tensor of flat row ``flat``."""
        return tuple(
            int(i) for i in torch.unravel_index(torch.tensor(flat), (*self.batch_shape, self.q))
        )

    def unit_values(self, sources: torch.Tensor | slice, keys: int) -> ValueVectors:
        """``(S_c, keys, d)`` float64: the values of ``sources`` (indices or a slice) on their
        first ``keys`` keys, divided by their scale (a fresh copy: never the caller's tensor).

        Converted chunk by chunk, not all at once when the layout is built: a float64 copy of
        every value vector (75 MB for MiniLM's 72 heads at 8 x 512 tokens) is above glibc's
        32 MB mmap threshold, so every call paid its page faults afresh (the layout took 27 ms
        of that projection's 167 ms on one thread, 22 of 126 on two); a chunk's copy (7 MB
        there) is served from the heap and its pages reused.
        """
        scale = self.source_scale[sources]
        return (
            self.source_values[sources, :keys]
            .to(torch.float64, copy=True)
            .div_(scale[:, None, None])
        )

    def row_masks(self) -> torch.Tensor:
        """``(R, n)``: the keys each row may use."""
        keys = torch.arange(self.n, device=self.rows.device)
        group = self.row_group
        return self.source_mask[self.group_source[group]] & (keys < self.group_prefix[group, None])

    def chunks(self, rank_width: int) -> Iterator[Chunk]:
        """Yield groups in chunks whose working set stays near :data:`CHUNK_BYTES`.

        Args:
            rank_width: columns of the bases the solver will build (``d`` or ``d + 1``).
        """
        device = self.rows.device
        keys = torch.arange(self.n, device=device)
        group_mask = self.source_mask[self.group_source] & (keys < self.group_prefix[:, None])
        # Keys past a group's last real key play no part: trim them per chunk. The bookkeeping is
        # a few integers per group: keep it on the CPU (no device sync per group on CUDA).
        last_key = (torch.where(group_mask, keys, -1).amax(-1) + 1).cpu()
        order = torch.argsort(last_key, stable=True)
        rows_per_group = torch.bincount(self.row_group, minlength=len(self.group_source)).cpu()
        by_group = torch.argsort(self.row_group, stable=True)
        row_start = torch.cumsum(rows_per_group, 0) - rows_per_group
        # Python integers for the per-group loop (indexing a tensor per group is a tensor op).
        order_list, last_list = order.tolist(), last_key.tolist()
        count_list, start_list = rows_per_group.tolist(), row_start.tolist()
        # Rows already sorted by group, one group per source (no causal prefixes): a chunk of
        # consecutive groups is then a view of the rows and a slice of the sources (a gathered
        # copy of the rows cost more than the rest of the layout on MiniLM's [CLS] rows, batch 8).
        in_order = bool((self.row_group[1:] >= self.row_group[:-1]).all())
        groups_total = len(self.group_source)
        one_per_source = groups_total == len(self.source_values) and bool(
            (self.group_source == torch.arange(groups_total, device=device)).all()
        )
        start = 0
        while start < len(order_list):
            stop, bytes_used = start, 0
            while stop < len(order_list):
                g = order_list[stop]
                cost = group_bytes(last_list[g], count_list[g], rank_width)
                if stop > start and bytes_used + cost > CHUNK_BYTES:
                    break
                bytes_used += cost
                stop += 1
            chosen = order_list[start:stop]
            groups = order[start:stop]
            n_c = max(last_list[g] for g in chosen)
            if n_c == self.n and chosen == list(range(len(order_list))):
                # everything, in order: the rows as they are
                yield self._whole(group_mask, by_group, in_order, one_per_source)
                return
            first, last = chosen[0], chosen[-1]
            if in_order and one_per_source and chosen == list(range(first, last + 1)):
                yield self._slice(group_mask, first, last + 1, start_list, count_list, n_c)
                start = stop
                continue
            row_ids = torch.cat(
                [by_group[start_list[g] : start_list[g] + count_list[g]] for g in chosen]
            )
            local = torch.repeat_interleave(torch.arange(len(groups)), rows_per_group[groups])
            groups = groups.to(device)
            yield Chunk(
                row_ids=row_ids,
                rows=self.rows[row_ids, :n_c],
                group=local.to(device),
                values=self.unit_values(self.group_source[groups], n_c),
                key_mask=group_mask[groups, :n_c],
            )
            start = stop

    def _slice(
        self,
        group_mask: torch.Tensor,
        first: int,
        stop: int,
        start_list: list[int],
        count_list: list[int],
        n_c: int,
    ) -> Chunk:
        """Groups ``first`` to ``stop - 1``, their rows as a view, for rows in group order and one
        group per source (see :meth:`chunks`)."""
        begin, end = start_list[first], start_list[stop - 1] + count_list[stop - 1]
        device = self.rows.device
        return Chunk(
            row_ids=torch.arange(begin, end, device=device),
            rows=self.rows[begin:end, :n_c],
            group=self.row_group[begin:end] - first,
            values=self.unit_values(slice(first, stop), n_c),
            key_mask=group_mask[first:stop, :n_c],
        )

    def _whole(
        self, group_mask: torch.Tensor, row_ids: torch.Tensor, in_order: bool, one_per_source: bool
    ) -> Chunk:
        """Every group as one chunk (``row_ids``: the rows sorted by group); the rows as they are
        when already in order (the common case of one group per head: [CLS] rows, full
        matrices)."""
        return Chunk(
            row_ids=row_ids,
            rows=self.rows if in_order else self.rows[row_ids],
            group=self.row_group if in_order else self.row_group[row_ids],
            values=self.unit_values(slice(None) if one_per_source else self.group_source, self.n),
            key_mask=group_mask,
        )


def _scale(values: ValueVectors, key_mask: KeyMask) -> torch.Tensor:
    """``(S,)`` float64: the largest magnitude of ``values`` ``(S, n, d)`` on real keys, per source
    (1 where they are all zero).

    Every result is invariant to the scale of ``V``; the tolerances, rank decisions and norms that
    lead to it are not (squared norms underflow below 1e-154 and overflow above 1e154 in float64),
    so the solvers see values divided by it (:meth:`RowLayout.unit_values`): of magnitude one.
    """
    # Largest magnitude per key from its max and min: no temporary of the values' size (such a
    # temporary cost ten times the rest on MiniLM's [CLS] rows).
    per_key = torch.maximum(values.amax(-1), values.amin(-1).neg()).to(torch.float64)
    largest = torch.where(key_mask, per_key, 0).amax(-1)
    return torch.where(largest > 0, largest, 1)


def build_layout(inputs: CheckedInputs, causal: bool) -> RowLayout:
    """Flatten ``inputs`` into rows (a float64 copy) and value-space groups (values as given,
    converted chunk by chunk); the inputs are untouched."""
    attn, values, key_mask = inputs.attn, inputs.values, inputs.key_mask
    batch_shape = inputs.batch_shape
    q, n = attn.shape[-2:]
    device = attn.device
    rows = attn.to(torch.float64).expand(*batch_shape, q, n).reshape(-1, n)

    # One "source" per distinct (values, key_mask) pair: broadcast dims of attn alone (e.g. the
    # query heads of a grouped-query value head) do not multiply the linear algebra.
    source_shape = torch.broadcast_shapes(values.shape[:-2], key_mask.shape[:-1])
    source_shape = torch.Size((1,) * (len(batch_shape) - len(source_shape)) + tuple(source_shape))
    n_sources = math.prod(source_shape)
    flat_values = values.expand(*source_shape, n, values.shape[-1]).reshape(n_sources, n, -1)
    flat_mask = key_mask.expand(*source_shape, n).reshape(n_sources, n)
    source_of_batch = (
        torch.arange(n_sources, device=device).reshape(source_shape).expand(batch_shape).reshape(-1)
    )
    source_of_row = source_of_batch.repeat_interleave(q)
    if causal:
        position = torch.arange(q, device=device).repeat(len(source_of_batch))
        used, row_group = torch.unique(source_of_row * n + position, return_inverse=True)
        group_source, group_prefix = used // n, used % n + 1
    else:
        group_source = torch.arange(n_sources, device=device)
        group_prefix = torch.full((n_sources,), n, device=device)
        row_group = source_of_row
    return RowLayout(
        batch_shape=batch_shape,
        q=q,
        n=n,
        rows=rows,
        row_group=row_group,
        source_values=flat_values,
        source_mask=flat_mask,
        group_source=group_source,
        group_prefix=group_prefix,
    )
