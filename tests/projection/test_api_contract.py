"""Property-based contract of the pure projections' public API (issue 18).

Every generated call either raises ``ValueError`` or ``TypeError`` whose message names an
argument that was made wrong, or returns a valid result: the right shape, finite, exactly zero on
masked keys, within the output tolerance, and, for efficient attention, a distribution over each
row's real keys. Inputs: any batch shape (zeros included), any number of rows and keys, masks
(all-masked examples included), causal or not, float32 and float64, values at extreme scales,
NaN and inf, wrong shapes, and bad options.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from captum_effattn import effective_attention, efficient_attention
from captum_effattn.projection import effective_attention_from_qk, efficient_attention_from_qk

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
SCALES = {torch.float32: (1e-30, 1.0, 1e30), torch.float64: (1e-250, 1e-100, 1.0, 1e100, 1e250)}
# Option values that are wrong, by option; None: left at its default.
BAD_OPTIONS = {
    "tol": (0.0, -1.0, float("nan")),
    "rank_rtol": (-1.0, 1.0, float("inf")),
    "max_newton_iter": (-1,),
    "distribution_tol": (0.0, -1e-3, 5.0),
}
GOOD_OPTIONS = {"rank_rtol": (1e-12,), "max_newton_iter": (0, 3), "distribution_tol": (1e-3,)}
CORRUPTIONS = ("nan_attn", "inf_values", "negative_attn", "masked_mass", "all_masked")
CORRUPTION_NAMES = {
    "nan_attn": "attn",
    "inf_values": "values",
    "negative_attn": "attn",
    "masked_mass": "attn",
    "all_masked": "key_mask",
    "wrong_values_shape": "values",
    "wrong_mask_shape": "key_mask",
    "no_keys": "attn",
    "no_features": "values",
}


@st.composite
def projection_calls(draw, efficient: bool):
    """``(kwargs, names)``: a call of a projection and the argument names made wrong."""
    wrong: set[str] = set()
    clean = draw(st.booleans())  # half the calls are valid: then every argument is right
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    batch = tuple(draw(st.lists(st.integers(0, 2), max_size=2)))
    n = draw(st.integers(1 if clean else 0, 9))
    d = draw(st.integers(1 if clean else 0, 4))
    causal = draw(st.booleans())
    q = n if causal else draw(st.integers(0, 4))
    if n == 0:
        wrong.add("no_keys")
    if d == 0:
        wrong.add("no_features")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    masked = draw(st.booleans())
    key_mask = torch.rand(*batch, n, generator=g) > 0.3 if masked else torch.ones(*batch, n) > 0
    if n:
        key_mask[..., 0] = True  # a causal first row must see a real key
    corruption = None if clean else draw(st.sampled_from((None, *CORRUPTIONS)))
    if corruption == "all_masked" and n and key_mask.numel():
        key_mask[(0,) * len(batch)] = False
        masked = True
        wrong.add(corruption)
    visible = key_mask[..., None, :].expand(*batch, q, n)
    if causal:
        visible = visible & torch.ones(q, n, dtype=torch.bool).tril()
    logits = 4 * torch.randn(*batch, q, n, generator=g, dtype=torch.float64)
    attn = logits.masked_fill(~visible, -torch.inf).softmax(-1).nan_to_num(0.0)
    values = torch.randn(*batch, n, d, generator=g, dtype=torch.float64)
    values = values * draw(st.sampled_from(SCALES[dtype]))
    attn, values = attn.to(dtype), values.to(dtype)
    if corruption in ("nan_attn", "negative_attn", "masked_mass") and attn.numel():
        index = (0,) * attn.dim()
        if corruption == "nan_attn":
            attn[index] = torch.nan
        elif corruption == "negative_attn" and efficient:
            attn[index] = -0.5
        elif corruption == "masked_mass" and not bool(visible[index]):
            attn[index] = 0.5
        else:
            corruption = None
        if corruption:
            wrong.add(corruption)
    if corruption == "inf_values" and values.numel():
        values.view(-1)[0] = torch.inf
        wrong.add(corruption)
    slips = (None,) if clean else (None, "wrong_values_shape", "wrong_mask_shape")
    shape_slip = draw(st.sampled_from(slips))
    if shape_slip == "wrong_values_shape":
        values = torch.cat([values, values[..., :1, :]], -2)
        wrong.add(shape_slip)
    elif shape_slip == "wrong_mask_shape":
        key_mask = torch.cat([key_mask, key_mask[..., :1]], -1)
        wrong.add(shape_slip)
    kwargs = {"attn": attn, "values": values, "causal": causal, "return_certificate": True}
    if masked or shape_slip == "wrong_mask_shape":
        kwargs["key_mask"] = key_mask
    names = {CORRUPTION_NAMES[w] for w in wrong}
    options = BAD_OPTIONS if efficient else {"tol": BAD_OPTIONS["tol"], "rank_rtol": (-1.0,)}
    for option, bad in options.items():
        choice = draw(st.sampled_from((None, "good") if clean else (None, "bad", "good")))
        if choice == "bad":
            kwargs[option] = draw(st.sampled_from(bad))
            names.add(option)
        elif choice == "good" and option in GOOD_OPTIONS and efficient:
            kwargs[option] = draw(st.sampled_from(GOOD_OPTIONS[option]))
    return kwargs, names, visible


def _call(project, *args, **kwargs):
    """``(result, None)``, or ``(None, error)`` for a ``ValueError`` or ``TypeError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a valid input converges: no ConvergenceWarning
            return project(*args, **kwargs), None
    except (ValueError, TypeError) as error:
        return None, error


def _rejected_for_a_named_reason(error, names) -> bool:
    """Whether the call raised; then it must be for one of ``names``, and say so."""
    event("raised" if error is not None else "returned")
    if error is None:
        assert not names, f"wrong {names} accepted"
        return False
    assert names, f"valid input rejected: {error}"
    assert any(name in str(error) for name in names), (names, str(error))
    return True


def _check_outcome(project, kwargs, names, visible):
    result, error = _call(project, **kwargs)
    if _rejected_for_a_named_reason(error, names):
        return None
    x, certificate = result
    attn = kwargs["attn"]
    assert x.shape == attn.shape
    assert x.dtype == attn.dtype
    assert torch.isfinite(x).all()
    assert (x[~visible] == 0).all()
    assert certificate.all_converged, certificate.summary()
    assert certificate.max_output_error <= kwargs.get("tol", 1e-9)
    return x


@given(call=projection_calls(efficient=True))
@SETTINGS
def test_efficient_attention_contract(call):
    kwargs, names, visible = call
    x = _check_outcome(efficient_attention, kwargs, names, visible)
    if x is not None:
        x64 = x.double()
        assert (x64 >= 0).all()
        sums = x64.sum(-1)
        real_rows = visible.any(-1)
        torch.testing.assert_close(sums[real_rows], torch.ones_like(sums[real_rows]))


@given(call=projection_calls(efficient=False))
@SETTINGS
def test_effective_attention_contract(call):
    kwargs, names, visible = call
    _check_outcome(effective_attention, kwargs, names, visible)


@pytest.mark.parametrize("project", [efficient_attention_from_qk, effective_attention_from_qk])
@given(data=st.data())
@SETTINGS
def test_from_qk_contract(project, data):
    draw = data.draw
    batch = tuple(draw(st.lists(st.integers(0, 2), max_size=1)))
    heads, n, d_k, d_v = (draw(st.integers(0, 3)) for _ in range(4))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    query = torch.randn(*batch, heads, n, d_k, generator=g, dtype=dtype)
    key = torch.randn(*batch, heads, n, d_k, generator=g, dtype=dtype)
    values = torch.randn(*batch, heads, n, d_v, generator=g, dtype=dtype)
    names = set()
    if heads == 0:
        names.add("head")
    if d_k == 0:
        names.add("d_k")
    if d_v == 0:
        names.add("values")
    if n == 0:
        names.update({"attn", "keys", "key"})
    if draw(st.booleans()) and values.numel():
        values.view(-1)[0] = torch.nan
        names.add("values")
    rows = draw(st.sampled_from((None, [], [0], [-1], [5])))
    if rows == [5] and n <= 5:
        names.add("rows")
    if rows in ([0], [-1]) and n == 0:
        names.add("rows")
    result, error = _call(
        project, query, key, values, causal=causal, rows=rows, return_certificate=True
    )
    if _rejected_for_a_named_reason(error, names):
        return
    x, certificate = result
    r = n if rows is None else len(rows)
    assert x.shape == (*batch, heads, r, n)
    assert torch.isfinite(x).all()
    assert certificate.all_converged
