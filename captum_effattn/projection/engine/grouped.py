"""Rows times per-group matrices, as large matrix products.

Row ``j`` belongs to group ``group[j]`` and is multiplied by that group's matrix ``M_g`` of shape
``(n, k)``. Two layouts, chosen by how many rows share a group:

- *shared* (many rows per group, e.g. all query rows of a head): one product per group over all its
  rows; ``B^T diag(w) B`` for every row of a group is a single GEMM against the group's outer
  products ``b_i b_i^T`` (one large product instead of many small per-row ones).
- *per row* (few rows per group, e.g. causal prefixes): each row carries its own copy of ``M_g`` and
  products are batched over rows.

:class:`TritonGroupedMatrices` computes the same maps with the Triton kernels of
:mod:`captum_effattn.kernels.grouped` (CUDA tensors), without the outer-product tensor.
"""

from __future__ import annotations

import torch

# Rows per group from which the shared layout (and its outer-product tensor) pays off.
SHARED_MIN_ROWS = 4


def uses_shared_layout(rows: int, groups: int) -> bool:
    """Whether ``rows`` spread over ``groups`` groups are computed group by group."""
    return rows >= SHARED_MIN_ROWS * max(groups, 1)


class GroupedMatrices:
    """Apply per-group matrices ``M_g`` (``(G, n, k)``) to rows assigned to groups.

    Args:
        matrices: ``(G, n, k)`` one matrix per group.
        group: ``(R,)`` group of each row.
    """

    def __init__(self, matrices: torch.Tensor, group: torch.Tensor, _cache: dict | None = None):
        self.matrices = matrices
        self.group = group
        # Shared with subsets: the outer products of all groups, built once on first use.
        self._cache = {} if _cache is None else _cache
        present, counts = torch.unique(group, return_counts=True)
        self._shared = uses_shared_layout(len(group), len(present))
        if self._shared:
            self._groups = present.tolist()
            if bool((group[1:] >= group[:-1]).all()):
                # Rows already sorted by group (as the solver lays them out): slices, no copies.
                ends = counts.cumsum(0).tolist()
                sizes = counts.tolist()
                self._rows_of_group = [
                    slice(end - size, end) for end, size in zip(ends, sizes, strict=True)
                ]
            else:
                order = torch.argsort(group, stable=True)
                self._rows_of_group = order.split(counts.tolist())
        elif len(group) == len(matrices) and bool(
            (group == torch.arange(len(group), device=group.device)).all()
        ):
            self._per_row = matrices  # one row per group, in order (e.g. [CLS] rows): no copy
        else:
            self._per_row = matrices[group]

    def __len__(self) -> int:
        return len(self.group)

    @property
    def width(self) -> int:
        return self.matrices.shape[-1]

    def subset(self, rows: torch.Tensor) -> GroupedMatrices:
        """The same maps for a subset of the rows (``rows``: indices or a boolean mask)."""
        return GroupedMatrices(self.matrices, self.group[rows], self._cache)

    def _by_group(self, inputs: torch.Tensor, operand) -> torch.Tensor:
        """``inputs_j @ operand(g)`` for each row ``j`` of group ``g``."""
        if len(self._groups) == 1:
            return inputs @ operand(self._groups[0])
        out = inputs.new_empty(len(inputs), operand(self._groups[0]).shape[-1])
        for g, rows in zip(self._groups, self._rows_of_group, strict=True):
            if isinstance(rows, slice):
                torch.mm(inputs[rows], operand(g), out=out[rows])
            else:
                out[rows] = inputs[rows] @ operand(g)
        return out

    def left(self, coords: torch.Tensor) -> torch.Tensor:
        """``M_g @ coords_j`` for each row: ``(R, k) -> (R, n)``."""
        if self._shared:
            return self._by_group(coords, lambda g: self.matrices[g].T)
        return torch.bmm(self._per_row, coords[..., None])[..., 0]

    def right(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows_j @ M_g`` for each row: ``(R, n) -> (R, k)``."""
        if self._shared:
            return self._by_group(rows, lambda g: self.matrices[g])
        return torch.bmm(rows[:, None, :], self._per_row)[:, 0]

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """``(rows_j @ M_g) @ M_g^T`` for each row: ``(R, n) -> (R, n)``."""
        return self.left(self.right(rows))

    def gram(self, weights: torch.Tensor) -> torch.Tensor:
        """``M_g^T diag(w_j) M_g`` for each row: ``(R, n) -> (R, k, k)``."""
        k = self.width
        if self._shared:
            if "outer" not in self._cache:
                m = self.matrices
                self._cache["outer"] = (m[..., :, None] * m[..., None, :]).reshape(
                    *m.shape[:-1], k * k
                )
            outer = self._cache["outer"]
            return self._by_group(weights, lambda g: outer[g]).reshape(-1, k, k)
        return torch.bmm((self._per_row * weights[..., None]).mT, self._per_row)


def gram_change(
    matrices: torch.Tensor, group: torch.Tensor, old: torch.Tensor, new: torch.Tensor
) -> torch.Tensor:
    """``M_g^T diag(new_j - old_j) M_g`` for each row, from the entries that differ only.

    What an active-set step changes is a few keys per row: summing their outer products costs
    ``changes * k^2`` where recomputing :meth:`GroupedMatrices.gram` costs ``R * n * k^2``.

    Args:
        matrices: ``(G, n, k)``; group: ``(R,)``; old, new: ``(R, n)`` weights.

    Returns:
        ``(R, k, k)``.
    """
    k = matrices.shape[-1]
    row, key = (new != old).nonzero(as_tuple=True)
    vectors = matrices[group[row], key]
    signed = (new[row, key] - old[row, key])[:, None, None] * vectors[:, :, None]
    change = new.new_zeros(len(new), k * k)
    change.index_add_(0, row, (signed * vectors[:, None, :]).reshape(-1, k * k))
    return change.reshape(-1, k, k)


class TritonGroupedMatrices:
    """:class:`GroupedMatrices` computed by Triton kernels (same arguments and methods)."""

    def __init__(self, matrices: torch.Tensor, group: torch.Tensor):
        from captum_effattn.kernels import grouped as kernels

        self._kernels = kernels
        self.matrices = matrices
        self.group = group
        self._blocks = kernels.RowBlocks.plan(group, len(matrices))

    def __len__(self) -> int:
        return len(self.group)

    @property
    def width(self) -> int:
        return self.matrices.shape[-1]

    def subset(self, rows: torch.Tensor) -> TritonGroupedMatrices:
        return TritonGroupedMatrices(self.matrices, self.group[rows])

    def left(self, coords: torch.Tensor) -> torch.Tensor:
        return self._kernels.grouped_left(self.matrices, self._blocks, coords)

    def right(self, rows: torch.Tensor) -> torch.Tensor:
        return self._kernels.grouped_right(self.matrices, self._blocks, rows)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        return self._kernels.grouped_project(self.matrices, self._blocks, rows)

    def gram(self, weights: torch.Tensor) -> torch.Tensor:
        return self._kernels.grouped_gram(self.matrices, self.group, weights)


GroupedProducts = GroupedMatrices | TritonGroupedMatrices
"""Either implementation of the per-group products (same methods)."""
