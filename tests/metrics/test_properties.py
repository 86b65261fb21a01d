"""Property-based tests of the metrics entry points on a tiny model and tokenizer (issue 18).

Every generated call either raises a documented error (``ValueError`` or ``TypeError``) whose
message names the argument, or returns a valid result: the right shapes, finite numbers inside
the metric's :attr:`MetricInfo.range`, no special token scored as a word.
"""

from __future__ import annotations

import math

import pytest
import torch
from captum.attr import Saliency
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captum_effattn.metrics import (
    Comprehensiveness,
    DeletionAUC,
    Infidelity,
    InsertionAUC,
    SensitivityMax,
    Sufficiency,
    TokenGate,
    compare_methods,
    gate_noise,
    token_removal,
)
from captum_effattn.metrics.eraser import area_under_curve, erasure_curve, perturbation_curve
from tests.attr.tiny_tokenizer import SPECIALS, WORDS, tiny_tokenizer
from tests.models.tiny import tiny_model

FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same inputs on every run: a failure reproduces in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SPECIAL_IDS = {0, 1, 2}  # <pad>, <s>, </s>; <unk> (3) is an unknown word, still a word
CLASSES = 3
POSITIONS = 64


@pytest.fixture(scope="module")
def gate():
    return TokenGate(tiny_model("bert"), tiny_tokenizer(bos=True))


def outcome(call, *names):
    """``call()``, or ``None`` when it raised a documented error naming one of ``names``."""
    try:
        return call()
    except (ValueError, TypeError) as error:
        failure = error
    assert any(name in str(failure) for name in names), f"{failure!r} names none of {names}"
    return None


def within(value: float, bounds: tuple[float, float]) -> bool:
    low, high = bounds
    return math.isfinite(value) and low - 1e-9 <= value <= high + 1e-9


word = st.one_of(st.sampled_from(WORDS[:20] + SPECIALS), st.text(max_size=4))
text = st.lists(word, max_size=5).map(" ".join)
texts = st.one_of(
    st.lists(text, max_size=3),
    text,  # a single string
    st.lists(st.one_of(text, st.integers(), st.none()), min_size=1, max_size=2),
    st.integers(),
    st.none(),
)
max_length = st.one_of(
    st.none(), st.integers(-2, POSITIONS + 8), st.floats(allow_nan=True), st.just("8")
)


@FAST
@given(texts=texts, max_length=max_length)
def test_encode(gate, texts, max_length):
    inputs = outcome(lambda: gate.encode(texts, max_length=max_length), "text", "max_length")
    if inputs is None:
        return
    assert isinstance(texts, list)
    assert len(inputs) == len(texts)
    assert inputs.input_ids.shape[1] <= (POSITIONS if max_length is None else max_length)
    assert inputs.removable.any(-1).all()  # every text has a word to remove
    assert not any(int(i) in SPECIAL_IDS for i in inputs.input_ids[inputs.removable])
    assert (inputs.gate == 1).all()


METRICS = [
    Comprehensiveness(bins=(0.5,)),
    Sufficiency(bins=(0.2, 1.0)),
    DeletionAUC(steps=2),
    InsertionAUC(steps=3),
    Infidelity(n_perturb_samples=2),
    SensitivityMax(n_perturb_samples=2),
]
target_value = st.one_of(st.integers(-1, CLASSES), st.floats(-1, CLASSES), st.booleans())
targets = st.one_of(
    st.just("predicted"),
    st.none(),
    st.sampled_from(["all", ""]),
    st.integers(-1, CLASSES),
    st.lists(target_value, max_size=4),
)


@FAST
@given(
    texts=st.one_of(st.lists(text, max_size=3), text),
    targets=targets,
    metrics=st.lists(st.sampled_from(METRICS), min_size=0, max_size=2, unique_by=id),
    batch_size=st.integers(-1, 3),
)
def test_compare_methods(gate, texts, targets, metrics, batch_size):
    result = outcome(
        lambda: compare_methods(
            gate,
            texts,
            targets,
            {"Saliency": Saliency},
            metrics,
            batch_size=batch_size,
            progress=False,
        ),
        "text",
        "target",
        "metrics",
        "batch_size",
    )
    if result is None:
        return
    assert isinstance(texts, list)  # a single string is refused, never iterated
    assert len(result.records) == len(texts) * len(metrics)
    ranges = {info.label: info.range for info in result.metrics}
    for record in result.records:
        assert within(record["value"], ranges[record["metric"]]), record
        assert 0 <= record["target"] < CLASSES
        if isinstance(targets, list):  # the class asked for, never a truncated float
            assert record["target"] == targets[record["example"]]
    assert len(result.summary()) == len(metrics)
    assert result.format()


WEIGHTS = torch.linspace(-1, 1, 6 * CLASSES).reshape(6, CLASSES)


def linear_classifier(gate):
    """``(N, 3)`` logits of a fixed linear model of the gate (up to 6 tokens)."""
    return gate @ WEIGHTS[: gate.shape[-1]].to(gate.dtype)


@st.composite
def token_batches(draw):
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    attributions = torch.tensor(
        draw(st.lists(floats, min_size=batch * length, max_size=batch * length))
    )
    removable = torch.tensor(
        draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
    )
    wrong_shape = draw(st.booleans()) and draw(st.booleans())
    shape = (batch, length + 1) if wrong_shape else (batch, length)
    target = draw(st.lists(st.integers(-1, CLASSES), min_size=batch, max_size=batch + 1))
    return (
        torch.ones(batch, length),
        attributions.reshape(batch, length),
        removable.reshape(batch, length)
        if not wrong_shape
        else torch.ones(shape, dtype=torch.bool),
        torch.tensor(target),
    )


@FAST
@given(
    batch=token_batches(),
    bins=st.one_of(st.lists(st.floats(-0.5, 1.5), max_size=3), st.just("0.5")),
    keep_top=st.booleans(),
)
def test_erasure_curve(batch, bins, keep_top):
    gate, attributions, removable, target = batch
    curve = outcome(
        lambda: erasure_curve(
            linear_classifier, gate, attributions, removable, target, bins=bins, keep_top=keep_top
        ),
        "bins",
        "target",
        "removable",
    )
    if curve is None:
        return
    assert curve.shape == (gate.shape[0], len(bins))
    assert torch.isfinite(curve).all()
    assert (curve.abs() <= 1).all()  # differences of probabilities: the metrics' (-1, 1)


@FAST
@given(
    batch=token_batches(),
    steps=st.one_of(st.integers(-1, 4), st.floats(0, 4)),
    insertion=st.booleans(),
)
def test_perturbation_curve(batch, steps, insertion):
    gate, attributions, removable, target = batch
    result = outcome(
        lambda: perturbation_curve(
            linear_classifier,
            gate,
            attributions,
            removable,
            target,
            steps=steps,
            insertion=insertion,
        ),
        "steps",
        "target",
        "removable",
    )
    if result is None:
        return
    fractions, curve = result
    assert curve.shape == (gate.shape[0], steps + 1)
    assert ((curve >= 0) & (curve <= 1)).all()
    area = area_under_curve(fractions, curve)
    assert ((area >= 0) & (area <= 1)).all()


fraction = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-1, 2),
    st.text(max_size=2),
    st.none(),
)
seed = st.one_of(st.integers(-2, 2**31), st.floats(0, 3), st.none())


@FAST
@given(probability=fraction, seed=seed, shape=st.tuples(st.integers(1, 3), st.integers(1, 5)))
def test_token_removal(probability, seed, shape):
    perturb = outcome(lambda: token_removal(probability, seed=seed), "drop_probability", "seed")
    if perturb is None:
        return
    gate = torch.ones(shape)
    removed, kept = perturb(gate)
    torch.testing.assert_close(removed + kept, gate)
    assert ((kept == 0) | (kept == 1)).all()


@FAST
@given(radius=fraction, seed=seed, shape=st.tuples(st.integers(1, 3), st.integers(1, 5)))
def test_gate_noise(radius, seed, shape):
    perturb = outcome(lambda: gate_noise(radius, seed=seed), "radius", "seed")
    if perturb is None:
        return
    faded = perturb(torch.ones(shape))
    assert faded.shape == shape
    assert ((faded <= 1) & (faded >= 1 - float(radius))).all()
