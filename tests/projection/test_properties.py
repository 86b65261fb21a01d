"""Hypothesis property tests over shapes, masks, causal structure and value ranks."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captum_effattn import effective_attention, efficient_attention
from captum_effattn.projection.solvers.compiled_newton import numba_available

# The CPU backends: batched PyTorch, and the compiled Newton phase where numba is installed.
CPU_BACKENDS = ["torch", "numba"] if numba_available() else ["torch"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    """A batch of attention rows over padded keys, with values of drawn rank."""
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    causal = draw(st.booleans())
    n = draw(st.integers(1, 40))
    q = n if causal else draw(st.integers(1, 6))
    d = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, tuple(batch), generator=g)
    key_mask = torch.arange(n) < lengths[..., None]
    if draw(st.booleans()):  # padding scattered anywhere, not only at the end
        key_mask = key_mask[..., torch.randperm(n, generator=g)]
    rank = draw(st.integers(1, d))
    values = torch.randn(*batch, n, rank, generator=g, dtype=torch.float64)
    values = values @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    sharpness = draw(st.sampled_from([0.5, 2.0, 8.0]))
    scores = torch.randn(*batch, q, n, generator=g, dtype=torch.float64) * sharpness
    visible = key_mask[..., None, :].expand(*batch, q, n)
    if causal:
        visible = visible & torch.ones(n, n, dtype=torch.bool).tril()
    # A causal row whose visible prefix is all padding is no attention row: unmask the first key.
    empty = ~visible.any(-1)
    if causal and empty.any():
        key_mask = key_mask.clone()
        key_mask[..., 0] = True
        visible = key_mask[..., None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    attn = scores.masked_fill(~visible, -torch.inf).softmax(-1)
    return attn, values, key_mask, causal, visible


def _output_error(x, attn, values):
    return ((x - attn) @ values).norm(dim=-1) / (attn @ values).norm(dim=-1).clamp_min(1e-300)


@SETTINGS
@given(problems(), st.sampled_from(CPU_BACKENDS))
def test_efficient_rows_are_distributions_with_the_same_output(problem, backend):
    attn, values, key_mask, causal, visible = problem
    x, cert = efficient_attention(
        attn, values, key_mask, causal, return_certificate=True, backend=backend
    )
    assert x.shape == attn.shape
    assert (x >= 0).all()
    assert (x[~visible] == 0).all()
    assert ((x.sum(-1) - 1).abs() <= 1e-12).all()
    assert (_output_error(x, attn, values) <= 1e-9).all()
    assert cert.all_converged
    assert (x.norm(dim=-1) <= attn.norm(dim=-1) + 1e-12).all()


@SETTINGS
@given(problems())
def test_efficient_is_unchanged_when_the_value_space_spans_the_visible_keys(problem):
    attn, values, key_mask, causal, visible = problem
    x = efficient_attention(attn, values, key_mask, causal)
    ones = torch.ones(*values.shape[:-1], 1, dtype=values.dtype)
    spanning = torch.cat([ones, values], -1)
    for index in torch.cartesian_prod(*[torch.arange(s) for s in attn.shape[:-1]]).reshape(
        -1, attn.dim() - 1
    ):
        idx = tuple(index.tolist())
        keys = visible[idx]
        rank = torch.linalg.matrix_rank(spanning[idx[:-1]][keys]) if keys.any() else 0
        if rank == int(keys.sum()):
            assert torch.equal(x[idx], attn[idx])


@SETTINGS
@given(problems())
def test_effective_reproduces_the_output_and_stays_on_visible_keys(problem):
    attn, values, key_mask, causal, visible = problem
    x = effective_attention(attn, values, key_mask, causal)
    assert (x[~visible] == 0).all()
    assert (_output_error(x, attn, values) <= 1e-9).all()
    # Minimum norm among rows with the same output: never longer than the row itself.
    assert (x.norm(dim=-1) <= attn.norm(dim=-1) + 1e-12).all()
