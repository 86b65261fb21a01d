"""Effective attention (Brunner et al. 2020): orthogonal projection onto the value space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_effattn import effective_attention
from tests.projection.problems import attention_rows, head_output_error, value_vectors
from tests.reference import effective_by_lstsq


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1)


def test_is_the_minimum_norm_row_with_the_same_output(gen):
    attn = attention_rows(6, 50, sharpness=2.0, generator=gen)
    values = value_vectors(50, 7, generator=gen)
    x, cert = effective_attention(attn, values, return_certificate=True)
    for row, a in zip(x, attn, strict=True):
        np.testing.assert_allclose(
            row.numpy(), effective_by_lstsq(a.numpy(), values.numpy()), atol=1e-12
        )
    assert head_output_error(x, attn, values).max() <= 1e-12
    assert cert.all_converged


def test_is_not_a_distribution_on_long_inputs(gen):
    """Why efficient attention exists: effective rows go negative and do not sum to one."""
    attn = attention_rows(4, 128, 128, sharpness=2.0, generator=gen)
    values = value_vectors(4, 128, 16, generator=gen)
    x, cert = effective_attention(attn, values, return_certificate=True)
    assert (x < 0).float().mean() > 0.1
    assert (x.sum(-1) - 1).abs().max() > 1e-2
    assert cert.simplex_violation.max() > 1e-2


def test_idempotent_and_identity_on_short_inputs(gen):
    attn = attention_rows(3, 60, 60, generator=gen)
    values = value_vectors(3, 60, 9, generator=gen)
    x = effective_attention(attn, values)
    torch.testing.assert_close(effective_attention(x, values), x, atol=1e-12, rtol=0)
    short = attention_rows(3, 8, 8, generator=gen)
    torch.testing.assert_close(
        effective_attention(short, value_vectors(3, 8, 9, generator=gen)), short
    )


def test_causal_rows_never_move_mass_onto_future_keys(gen):
    n, d = 40, 5
    attn = attention_rows(2, n, n, generator=gen).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    values = value_vectors(2, n, d, generator=gen)
    x = effective_attention(attn, values, causal=True)
    assert (x.triu(1) == 0).all()
    for i in (3, 17, n - 1):
        prefix = effective_attention(attn[:, i : i + 1, : i + 1], values[:, : i + 1])
        torch.testing.assert_close(x[:, i : i + 1, : i + 1], prefix, atol=1e-12, rtol=0)
