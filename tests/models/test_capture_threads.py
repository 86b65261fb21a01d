"""One model shared by threads: captures belong to the thread that opened them.

Two threads attributing on one model get what serial calls get, and a thread serving plain
forwards on a model another thread is attributing on gets exactly the outputs it gets alone.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.models import capture_attention
from tests.attr.helpers import text_setup

CALLS = 12


def _attribute(explainer, ids, mask):
    return explainer.attribute(ids, additional_forward_args=(mask,), return_convergence_delta=True)


def _in_threads(*jobs):
    """Run each zero-argument job on its own thread, started together; their results in order."""
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return [future.result() for future in [pool.submit(run, job) for job in jobs]]


@pytest.mark.parametrize(("name", "implementation"), [("bert", "sdpa"), ("gpt2", "eager")])
def test_two_threads_attributing_on_one_model_get_the_serial_results(name, implementation):
    model, forward, ids, mask = text_setup(name, implementation=implementation)
    explainer = EfficientAttentionAttribution(forward, model=model)
    serial_scores, serial_delta = _attribute(explainer, ids, mask)

    def many():
        return [_attribute(explainer, ids, mask) for _ in range(CALLS)]

    for results in _in_threads(many, many):
        for scores, delta in results:
            torch.testing.assert_close(scores, serial_scores, rtol=0, atol=0)
            torch.testing.assert_close(delta, serial_delta, rtol=0, atol=0)


def _beside_plain_forwards(name: str, implementation: str, **options) -> torch.nn.Module:
    """One thread attributing (with ``options``), one running plain forwards on the same model:
    each gets exactly what it gets alone. Returns the model."""
    model, forward, ids, mask = text_setup(name, implementation=implementation)
    explainer = EfficientAttentionAttribution(forward, model=model)
    with torch.no_grad():
        reference = forward(ids, mask)
    serial_scores = explainer.attribute(ids, additional_forward_args=(mask,))

    def attributions():
        return [
            explainer.attribute(ids, additional_forward_args=(mask,), **options)
            for _ in range(CALLS)
        ]

    def plain_forwards():
        with torch.no_grad():
            return [forward(ids, mask) for _ in range(4 * CALLS)]

    scores, outputs = _in_threads(attributions, plain_forwards)
    for attribution in scores:
        torch.testing.assert_close(attribution, serial_scores, rtol=0, atol=0)
    for output in outputs:
        assert torch.equal(output, reference)
    return model


@pytest.mark.parametrize(("name", "implementation"), [("bert", "sdpa"), ("gpt2", "eager")])
def test_plain_forwards_beside_an_attribution_are_bit_identical(name, implementation):
    model = _beside_plain_forwards(name, implementation)
    assert model.config._attn_implementation == implementation


def test_capture_is_invisible_to_other_threads():
    model, forward, ids, mask = text_setup("bert")
    opened, release = threading.Event(), threading.Event()
    seen = {}

    def capturing():
        with capture_attention(model) as record:
            seen["inside"] = model.config._attn_implementation
            opened.set()
            release.wait(10)
            with torch.no_grad():
                forward(ids, mask)
        return record

    def other():
        opened.wait(10)
        seen["other"] = model.config._attn_implementation
        with torch.no_grad():
            output = forward(ids, mask)
        release.set()
        return output

    record, _ = _in_threads(capturing, other)
    assert seen["other"] == "sdpa"
    assert seen["inside"] != "sdpa"
    assert len(record.calls) == 1  # the other thread's forward was not captured


def test_nesting_on_one_thread_is_still_refused():
    model, *_ = text_setup("bert")
    with (
        capture_attention(model),
        pytest.raises(RuntimeError, match="cannot be nested"),
        capture_attention(model),
    ):
        pass


def test_a_stopped_pass_ends_only_its_own_threads_forward():
    """A thread attributing with ``stop_early=True`` beside one running whole forwards: the stop
    ends the stopping thread's pass, the other thread's outputs are exactly its outputs alone."""
    model = _beside_plain_forwards("bert", "sdpa", stop_early=True)
    assert model.config._attn_implementation == "sdpa"
