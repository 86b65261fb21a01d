"""Grouped-product kernels against the PyTorch path (GroupedMatrices), over awkward sizes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from captum_effattn.kernels import grouped
from captum_effattn.projection.engine.grouped import GroupedMatrices

# Relative agreement with the PyTorch path, by dtype.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_agrees(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    scale = expected.abs().max().clamp_min(1e-30)
    error = float((actual.cpu() - expected.cpu()).abs().max() / scale)
    assert error <= RTOL[expected.dtype], f"relative error {error:.2e}"


def problem(groups, rows, n, k, dtype, gen, device):
    matrices = torch.randn(groups, n, k, generator=gen, dtype=torch.float64).to(dtype)
    group = torch.randint(groups, (rows,), generator=gen)
    # Rows of the same group in scattered order, as the solver's subsets leave them.
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)
    weights = (torch.rand(rows, n, generator=gen, dtype=torch.float64) > 0.4).to(dtype)
    return [t.to(device) for t in (matrices, group, x, weights)]


# (groups, rows, n, k): k = d + 1 for d in {32, 64, 128}; n not a multiple of the key block; both
# the shared layout (many rows per group) and the per-row one (one row per group).
SIZES = [
    (3, 24, 100, 33),
    (6, 6, 77, 65),
    (2, 5, 130, 129),
    (1, 70, 47, 33),
    (4, 4, 1, 17),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("groups", "rows", "n", "k"), SIZES)
def test_products_agree_with_pytorch(groups, rows, n, k, dtype, gen, device):
    matrices, group, x, weights = problem(groups, rows, n, k, dtype, gen, device)
    reference = GroupedMatrices(matrices.cpu(), group.cpu())
    blocks = grouped.RowBlocks.plan(group, groups)
    coords = reference.right(x.cpu())
    assert_agrees(grouped.grouped_right(matrices, blocks, x), coords)
    assert_agrees(grouped.grouped_left(matrices, blocks, coords.to(device)), reference.left(coords))
    assert_agrees(grouped.grouped_project(matrices, blocks, x), reference.project(x.cpu()))
    assert_agrees(grouped.grouped_gram(matrices, group, weights), reference.gram(weights.cpu()))


def test_gram_is_symmetric_and_exact_on_diagonal_weights(gen, device):
    matrices, group, _, weights = problem(2, 5, 90, 65, torch.float64, gen, device)
    gram = grouped.grouped_gram(matrices, group, weights).cpu()
    torch.testing.assert_close(gram, gram.mT, atol=0, rtol=0)
    # All-ones weights on an orthonormal basis give the identity.
    basis = torch.linalg.qr(matrices.cpu())[0].to(device)
    eye = grouped.grouped_gram(basis, group, torch.ones_like(weights)).cpu()
    torch.testing.assert_close(eye, torch.eye(65, dtype=torch.float64).expand(5, 65, 65))


def test_strided_operands(gen, device):
    """Transposed and sliced views take the same path as contiguous tensors (strides passed)."""
    matrices, group, x, weights = problem(3, 20, 96, 33, torch.float64, gen, device)
    strided_m = matrices.mT.contiguous().mT  # (G, n, k) with unit stride along n
    strided_x = torch.stack([x, x], -1)[..., 0]  # stride 2 along keys
    blocks = grouped.RowBlocks.plan(group, 3)
    reference = GroupedMatrices(matrices.cpu(), group.cpu())
    assert not strided_m.is_contiguous()
    assert not strided_x.is_contiguous()
    assert_agrees(grouped.grouped_project(strided_m, blocks, strided_x), reference.project(x.cpu()))
    assert_agrees(grouped.grouped_gram(strided_m, group, weights), reference.gram(weights.cpu()))


def test_schedule_blocks_never_straddle_groups(gen):
    group = torch.randint(5, (300,), generator=gen)
    blocks = grouped.RowBlocks.plan(group, 7)
    assert blocks.block_rows in (16, 64)
    assert int(blocks.count.sum()) == 300
    assert (blocks.count > 0).all()
    assert (blocks.count <= blocks.block_rows).all()
    for start, count, g in zip(blocks.start, blocks.count, blocks.group, strict=True):
        rows = blocks.order[start : start + count]
        assert (group[rows] == g).all()
    assert sorted(blocks.order.tolist()) == list(range(300))


def test_no_rows(device):
    matrices = torch.randn(2, 10, 17, dtype=torch.float64, device=device)
    group = torch.zeros(0, dtype=torch.long, device=device)
    blocks = grouped.RowBlocks.plan(group, 2)
    x = torch.zeros(0, 10, dtype=torch.float64, device=device)
    assert grouped.grouped_right(matrices, blocks, x).shape == (0, 17)
    assert grouped.grouped_gram(matrices, group, x).shape == (0, 17, 17)


def test_bad_operands(device):
    matrices = torch.randn(2, 10, 17, dtype=torch.float64, device=device)
    group = torch.zeros(3, dtype=torch.long, device=device)
    blocks = grouped.RowBlocks.plan(group, 2)
    rows = torch.randn(3, 10, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match=r"operands must share one dtype.*rows torch.float32"):
        grouped.grouped_right(matrices, blocks, rows.float())
    with pytest.raises(TypeError, match=r"dtype torch.float16 is not supported"):
        grouped.grouped_right(matrices.half(), blocks, rows.half())
    with pytest.raises(ValueError, match=r"rows must have 10 columns"):
        grouped.grouped_right(matrices, blocks, rows[:, :9])
    with pytest.raises(ValueError, match=r"all tensors must be on one device.*rows on meta"):
        grouped.grouped_right(matrices, blocks, rows.to("meta"))
    with pytest.raises(ValueError, match=r"the schedule covers 3 rows; got 2 rows"):
        grouped.grouped_right(matrices, blocks, rows[:2])
    wide = torch.randn(1, 10, 300, dtype=torch.float64, device=device)
    with pytest.raises(
        ValueError, match=r"the matrices' width k is 300, beyond the kernels' limit"
    ):
        grouped.grouped_gram(wide, group[:1], rows[:1])
