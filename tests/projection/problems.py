"""Random projection problems for the tests (seeded, float64 unless asked otherwise)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from captum_effattn.projection.basis import value_space_basis
from captum_effattn.projection.engine.grouped import GroupedMatrices


def attention_rows(
    *shape: int, sharpness: float = 1.0, generator: torch.Generator, dtype=torch.float64
) -> torch.Tensor:
    """Softmax rows of shape ``shape`` (last dim = keys); larger ``sharpness`` = peakier rows."""
    scores = torch.randn(*shape, generator=generator, dtype=torch.float64) * sharpness
    return scores.softmax(-1).to(dtype)


def value_vectors(*shape: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def grouped_rows_problem(
    groups: int, rows_per_group: int, n: int, d: int, padded: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, key_mask, group, rows)`` for the compiled solvers: ``groups`` heads of ``n``
    keys (the last ``padded`` masked) and ``d`` value columns, ``rows_per_group`` attention rows
    each (normalized over the real keys)."""
    gen = torch.Generator().manual_seed(seed)
    values = value_vectors(groups, n, d, generator=gen)
    key_mask = torch.ones(groups, n, dtype=torch.bool)
    key_mask[:, n - padded :] = False
    group = torch.arange(groups).repeat_interleave(rows_per_group)
    attn = attention_rows(len(group), n, sharpness=3.0, generator=gen) * key_mask[group]
    return values, key_mask, group, attn / attn.sum(-1, keepdim=True)


def head_output_error(x: torch.Tensor, a: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``||x V - a V|| / ||a V||`` per row, in float64."""
    x, a, values = x.double(), a.double(), values.double()
    return ((x - a) @ values).norm(dim=-1) / (a @ values).norm(dim=-1)


def dual_problem(
    groups: int, rows_per_group: int, n: int, d: int, padded: int, seed: int
) -> tuple[GroupedMatrices, torch.Tensor]:
    """The Newton phases' input for :func:`grouped_rows_problem`: orthonormal bases of ``[1, V]``
    per head, and the coordinates ``c = B^T a`` of its rows."""
    values, key_mask, group, attn = grouped_rows_problem(groups, rows_per_group, n, d, padded, seed)
    basis, _ = value_space_basis(values, key_mask, with_ones=True)
    ops = GroupedMatrices(basis, group)
    return ops, ops.right(attn)


@st.composite
def grouped_problem_shapes(draw, max_rows_per_group: int = 6, max_n: int = 60) -> tuple[int, ...]:
    """``(groups, rows_per_group, n, d, padded, seed)`` for :func:`grouped_rows_problem` and
    :func:`dual_problem` (at least one real key)."""
    n = draw(st.integers(2, max_n))
    return (
        draw(st.integers(1, 4)),
        draw(st.integers(1, max_rows_per_group)),
        n,
        draw(st.integers(1, 12)),
        min(draw(st.integers(0, 5)), n - 1),
        draw(st.integers(0, 2**16)),
    )
