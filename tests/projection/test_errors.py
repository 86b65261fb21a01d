"""Bad input gets a specific error, never a silent wrong answer."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import effective_attention, efficient_attention


@pytest.fixture
def good():
    g = torch.Generator().manual_seed(3)
    attn = torch.randn(2, 10, 10, generator=g, dtype=torch.float64).softmax(-1)
    values = torch.randn(2, 10, 4, generator=g, dtype=torch.float64)
    return attn, values


PROJECTIONS = [efficient_attention, effective_attention]


@pytest.mark.parametrize("project", PROJECTIONS)
def test_values_with_the_wrong_number_of_keys(good, project):
    attn, values = good
    with pytest.raises(
        ValueError, match=r"values must have shape \(\*batch, n, d\) with n = 10 keys"
    ):
        project(attn, values[:, :9])


@pytest.mark.parametrize("project", PROJECTIONS)
def test_key_mask_with_the_wrong_length(good, project):
    attn, values = good
    with pytest.raises(
        ValueError, match=r"key_mask must have shape \(\*batch, n\) with n = 10.*\(2, 9\)"
    ):
        project(attn, values, key_mask=torch.ones(2, 9, dtype=torch.bool))


@pytest.mark.parametrize("project", PROJECTIONS)
def test_batch_dimensions_that_do_not_broadcast(good, project):
    attn, values = good
    with pytest.raises(ValueError, match=r"leading \(batch\) dimensions do not broadcast"):
        project(attn, values.expand(3, 2, 10, 4)[..., :1, :, :].expand(3, 3, 10, 4))


@pytest.mark.parametrize("project", PROJECTIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(good, project, bad):
    attn, values = good
    values = values.clone()
    values[1, 3, 2] = bad
    with pytest.raises(ValueError, match=r"values contains 1 non-finite value.*index \[1, 3, 2\]"):
        project(attn, values)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_non_finite_attention(good, project):
    attn, values = good
    attn = attn.clone()
    attn[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"attn contains 1 non-finite value.*index \[0, 0, 0\]"):
        project(attn, values)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_all_keys_masked(good, project):
    attn, values = good
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"masks every key of the example at batch index \[1\]"):
        project(attn, values, key_mask=mask)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_causal_needs_square_attention(good, project):
    attn, values = good
    with pytest.raises(
        ValueError, match=r"causal=True needs full square attention.*q = 3 rows over n = 10"
    ):
        project(attn[:, :3], values, causal=True)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_integer_and_non_tensor_inputs(good, project):
    attn, values = good
    with pytest.raises(TypeError, match="attn must be a floating-point tensor"):
        project(attn.long(), values)
    with pytest.raises(TypeError, match=r"values must be a torch\.Tensor"):
        project(attn, values.tolist())


def test_rows_that_are_not_distributions(good):
    attn, values = good
    logits = attn.log()
    with pytest.raises(ValueError, match=r"attn row at index \[0, 0\].*has a negative entry"):
        efficient_attention(logits, values)
    with pytest.raises(ValueError, match=r"sums to 2 over its real keys"):
        efficient_attention(attn * 2, values)
    mask = torch.ones(10, dtype=torch.bool)
    mask[-1] = False
    with pytest.raises(ValueError, match=r"puts mass .* on masked \(padding or future\) keys"):
        efficient_attention(attn, values, key_mask=mask)


def test_causal_rows_with_mass_on_future_keys(good):
    attn, values = good
    with pytest.raises(ValueError, match=r"on masked \(padding or future\) keys"):
        efficient_attention(attn, values, causal=True)


def test_bad_options(good):
    attn, values = good
    with pytest.raises(ValueError, match="solver must be one of"):
        efficient_attention(attn, values, solver="cvx")
    with pytest.raises(ValueError, match="tol must be positive"):
        efficient_attention(attn, values, tol=0)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_attention_rows_are_not_broadcast_against_values(good, project):
    """(heads, n) rows with (heads, n, d) values is a classic slip: say how to write it."""
    attn, values = good
    rows = attn[:, 0]  # (2, 10): one row per head, missing its q axis
    with pytest.raises(
        ValueError, match=r"broadcast to attn's leading dimensions.*\(\.\.\., heads, 1, n\)"
    ):
        project(rows, values)
    assert project(rows[:, None], values).shape == (2, 1, 10)
