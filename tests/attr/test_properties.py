"""Property-based test of ``EfficientAttentionAttribution.attribute`` on tiny models (issue 18).

Every generated call (views, weightings, reductions, query rows, layer and head selections,
targets, padding, including impossible values) either raises a documented error (``ValueError``
or ``TypeError``) whose message names what was wrong, or returns a valid result: finite scores of
the promised shape, exactly 0 on padding, and distributions where they are promised (a
distribution view, no weighting, the mean over heads of one row per example sums to 1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import REDUCTIONS, VIEWS, WEIGHTINGS
from tests.models.tiny import tiny_model

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same inputs on every run: a failure reproduces in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# What an error message may name: an argument, or the input property it is about.
NAMED = (
    "inputs",
    "view",
    "weighting",
    "reduce",
    "query",
    "layer",
    "head",
    "target",
    "padding",
    "example",
    "rollout",
)
VOCAB = 64
OUTCOMES: list[bool] = []  # True where a generated call returned scores


@pytest.fixture(scope="module")
def methods():
    made = {}
    for name in ("bert", "llama"):
        model = tiny_model(name)

        def forward(input_ids, attention_mask, model=model):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits[:, -1] if logits.dim() == 3 else logits  # decoders: next-token logits

        made[name] = EfficientAttentionAttribution(forward, model=model)
    return made


@st.composite
def calls(draw):
    model = draw(st.sampled_from(["bert", "llama"]))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(2, 12))
    real = [draw(st.integers(0 if i else 1, length)) for i in range(batch)]
    options = {
        "view": draw(st.sampled_from([*VIEWS, "attention"])),
        "weighting": draw(st.sampled_from([None, *WEIGHTINGS, "saliency"])),
        "reduce": draw(st.sampled_from([*REDUCTIONS, None, "median"])),
        "query": draw(st.sampled_from(["auto", "all", "first"]) | st.integers(-3, 14)),
        "layers": draw(st.sampled_from([None, "all", 0, 1, -1, 2, -3])),
        "heads": draw(st.sampled_from([None, "all", 0, 1, [0, 1], 7])),
        "target": draw(st.sampled_from([None, 0, 1, 2, -1, 99, 0.5])),
    }
    return model, batch, length, real, options


def encode(model: str, batch: int, length: int, real: list[int]):
    generator = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, count in enumerate(real):
        if model == "llama":  # decoders pad on the left, encoders on the right
            mask[row, length - count :] = 1
        else:
            mask[row, :count] = 1
    return ids, mask


@SETTINGS
@given(call=calls())
def test_attribute_returns_valid_scores_or_names_the_problem(methods, call):
    model, batch, length, real, options = call
    ids, mask = encode(model, batch, length, real)
    try:
        scores = methods[model].attribute(ids, additional_forward_args=(mask,), **options)
    except (ValueError, TypeError) as error:
        failure = error
    else:
        failure = None
    OUTCOMES.append(failure is None)
    if failure is not None:
        message = str(failure).lower()
        assert any(word in message for word in NAMED), f"{failure!r} names nothing it checked"
        return
    assert all(count > 0 for count in real), "an all-padding example must be refused"
    assert torch.isfinite(scores).all()
    if options["reduce"] is None:
        assert scores.shape[0] == batch
        assert scores.shape[-1] == length
        token_scores = scores.flatten(1, -2)
    else:
        assert scores.shape == (batch, length)
        token_scores = scores[:, None]
    padding = mask == 0
    assert (token_scores[padding[:, None].expand_as(token_scores)] == 0).all()
    view = VIEWS[options["view"]]
    one_row = options["query"] == "auto" or isinstance(options["query"], int)
    if view.distribution and options["weighting"] is None and options["reduce"] == "mean":
        if one_row:
            sums = scores.sum(-1).double()
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-4), sums
        assert (scores >= -1e-6).all()


def test_the_generated_calls_mix_results_and_errors():
    # Run after the property test (same module, file order): it must not be all errors (or all
    # results), or the property above checked only one side.
    if not OUTCOMES:
        pytest.skip("the property test did not run first")
    assert 0.2 < sum(OUTCOMES) / len(OUTCOMES) < 0.9, sum(OUTCOMES)
