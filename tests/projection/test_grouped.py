"""GroupedMatrices (the PyTorch path): both layouts, rows in any order, and the Gram update."""

from __future__ import annotations

import pytest
import torch

from captum_effattn.projection.engine.grouped import (
    GroupedMatrices,
    gram_change,
    uses_shared_layout,
)


def _problem(groups: int, rows: int, n: int = 20, k: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    matrices = torch.randn(groups, n, k, generator=gen, dtype=torch.float64)
    group = torch.randint(groups, (rows,), generator=gen)
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    weights = (torch.rand(rows, n, generator=gen, dtype=torch.float64) > 0.5).double()
    return matrices, group, x, weights


def _expected(matrices, group, x, weights):
    m = matrices[group]
    return (
        (m @ x[:, : m.shape[-1], None])[..., 0],
        (x[:, None, :] @ m)[:, 0],
        m.mT @ (m * weights[..., None]),
    )


@pytest.mark.parametrize(("groups", "rows"), [(3, 40), (1, 9), (6, 6), (4, 100)])
@pytest.mark.parametrize("sort", [False, True])
def test_products_match_per_row_matrices(groups, rows, sort):
    matrices, group, x, weights = _problem(groups, rows)
    if sort:  # rows laid out group by group, as the solver's chunks are: the slice path
        group = group.sort().values
    ops = GroupedMatrices(matrices, group)
    left, right, gram = _expected(matrices, group, x, weights)
    k = matrices.shape[-1]
    torch.testing.assert_close(ops.left(x[:, :k]), left, atol=1e-12, rtol=0)
    torch.testing.assert_close(ops.right(x), right, atol=1e-12, rtol=0)
    torch.testing.assert_close(ops.gram(weights), gram, atol=1e-12, rtol=0)
    keep = torch.arange(rows) % 3 != 1
    sub = ops.subset(keep)
    torch.testing.assert_close(sub.right(x[keep]), right[keep], atol=1e-12, rtol=0)


def test_both_layouts_are_exercised():
    assert uses_shared_layout(40, 3)
    assert not uses_shared_layout(6, 6)


@pytest.mark.parametrize(("groups", "rows"), [(3, 40), (6, 6)])
def test_gram_change_is_the_difference_of_grams(groups, rows):
    matrices, group, _, old = _problem(groups, rows)
    new = old.clone()
    flip = torch.rand(old.shape, generator=torch.Generator().manual_seed(9)) < 0.1
    new[flip] = 1 - new[flip]
    ops = GroupedMatrices(matrices, group)
    change = gram_change(matrices, group, old, new)
    torch.testing.assert_close(change, ops.gram(new) - ops.gram(old), atol=1e-12, rtol=0)
    unchanged = gram_change(matrices, group, old, old)
    assert (unchanged == 0).all()
