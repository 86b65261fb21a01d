"""Per-row reductions in blocks of rows equal the reduction over all rows at once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_effattn.projection.engine import row_blocks
from captum_effattn.projection.engine.certify import simplex_violation
from captum_effattn.projection.engine.row_blocks import per_row
from captum_effattn.projection.engine.validation import check_distributions


def _terms(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack(((x * mask).sum(-1), x.amin(-1)), -1)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), keys=st.integers(1, 40), entries=st.integers(1, 300))
def test_blocks_of_rows_match_all_rows_at_once(rows, keys, entries):
    generator = torch.Generator().manual_seed(rows * 1000 + keys)
    x = torch.randn(rows, keys, dtype=torch.float64, generator=generator)
    mask = torch.rand(rows, keys, generator=generator) < 0.7
    assert torch.equal(per_row(_terms, x, mask, block_entries=entries), _terms(x, mask))
    single = per_row(lambda v: v.sum(-1), x, block_entries=entries)
    assert single.shape == (rows,)
    assert torch.equal(single, x.sum(-1))


def test_simplex_violation_in_blocks_sees_every_row(monkeypatch):
    # 10 rows of 8 keys in blocks of 2 rows: the one bad row (index 7) must still be found.
    monkeypatch.setattr(row_blocks, "BLOCK_ENTRIES", 16)
    x = torch.full((10, 8), 1 / 8, dtype=torch.float64)
    mask = torch.ones(10, 8, dtype=torch.bool)
    x[7, 0] -= 0.25
    violation = simplex_violation(x, mask)
    assert violation.shape == (10,)
    assert float(violation[7]) == 0.25
    assert float(violation.abs().sum() - violation[7]) <= 1e-15


def test_distribution_check_in_blocks_names_the_failing_row(monkeypatch):
    monkeypatch.setattr(row_blocks, "BLOCK_ENTRIES", 16)
    x = torch.full((10, 8), 1 / 8, dtype=torch.float64)
    mask = torch.ones(10, 8, dtype=torch.bool)
    mask[:, -1] = False
    x[:, -1] = 0
    x[:, 0] += 1 / 8
    x[7, -1] = 0.5  # mass on a masked key, in the fourth block
    with pytest.raises(ValueError, match=r"row at index \[7\] .* puts mass 0\.5 on masked"):
        check_distributions(x, mask, 1e-9, x.shape, lambda i: (i,))
    x[7, -1] = 0
    check_distributions(x, mask, 1e-9, x.shape, lambda i: (i,))  # every row valid: no error
