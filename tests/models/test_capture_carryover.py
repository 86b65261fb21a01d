"""capture_attention(carryover=...): the record is the model's own tensors, kept alive past the
block until the next capture with the same carryover records their successors, and each thread's
attributions carry over their own."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.models import capture_attention, select_heads
from captum_effattn.models.carryover import (
    CARRIED_BYTES,
    CaptureCarryover,
    release_thread_carryover,
    thread_carryover,
    thread_scratch,
)
from tests.attr.helpers import forward_embeddings
from tests.models.tiny import TINY_MODELS, tiny_inputs, tiny_model

TEXT_MODELS = tuple(name for name in TINY_MODELS if name != "vit")
SELECTION = {"layers": [0, 2], "heads": {2: [1, 3]}}


def _lazy_layers(model, inputs, selection=None, carryover=None):
    with (
        torch.no_grad(),
        capture_attention(model, selection, materialize=False, carryover=carryover) as record,
    ):
        model(**inputs)
    return record.layers


def _tensors(layers):
    return [t for c in layers for t in (c.query, c.key, c.values)]


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_the_record_is_the_same_and_kept_past_the_block(name):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding="right")
    selection = select_heads(model, **SELECTION)
    carryover = CaptureCarryover()
    carried = _lazy_layers(model, inputs, selection, carryover)
    plain = _lazy_layers(model, inputs, selection)
    for a, b in zip(_tensors(carried), _tensors(plain), strict=True):
        assert torch.equal(a, b)
    # The record's own tensors (no copies), every one of them kept.
    assert [id(t) for t in carryover.kept] == [id(t) for t in _tensors(carried)]


def test_the_next_capture_lets_the_last_ones_go_one_by_one():
    model = tiny_model("bert")
    carryover = CaptureCarryover()
    first = weakref.WeakSet(_tensors(_lazy_layers(model, tiny_inputs("bert"), None, carryover)))
    gc.collect()
    assert len(first) == 3 * 3  # three layers' queries, keys and values, alive past the call
    released = []

    def record_layer(captured):
        gc.collect()
        released.append(len(first))

    with (
        torch.no_grad(),
        capture_attention(
            model, materialize=False, carryover=carryover, on_layer=record_layer
        ) as record,
    ):
        model(**tiny_inputs("bert", padding=None))
    # Layer k's three tensors replaced layer k's of the capture before, as they were recorded.
    assert released == [6, 3, 0]
    assert len(carryover.kept) == 9
    assert all(any(t is k for k in carryover.kept) for t in _tensors(record.layers))


def test_beyond_max_bytes_nothing_is_kept():
    model = tiny_model("bert")
    carryover = CaptureCarryover(max_bytes=0)
    kept = weakref.WeakSet(_tensors(_lazy_layers(model, tiny_inputs("bert"), None, carryover)))
    gc.collect()
    assert carryover.kept == ()
    assert len(kept) == 0


def test_release_lets_everything_go():
    model = tiny_model("bert")
    carryover = CaptureCarryover()
    layers = _lazy_layers(model, tiny_inputs("bert"), None, carryover)
    expected = sum(t.numel() * t.element_size() for t in _tensors(layers))
    kept = weakref.WeakSet(_tensors(layers))
    del layers
    assert carryover.release() == expected
    gc.collect()
    assert len(kept) == 0
    assert carryover.release() == 0


def test_a_carryover_refuses_keep_graph():
    model = tiny_model("bert")
    with (
        pytest.raises(ValueError, match="one or the other"),
        capture_attention(model, keep_graph=True, carryover=CaptureCarryover()),
    ):
        pass


@pytest.mark.parametrize("carryover", [True, 64, [], CaptureCarryover])
def test_a_carryover_of_another_type_is_refused(carryover):
    model = tiny_model("bert")
    with (
        pytest.raises(TypeError, match="carryover must be a CaptureCarryover or None"),
        capture_attention(model, materialize=False, carryover=carryover),
    ):
        pass


@pytest.mark.parametrize("max_bytes", [-1, 1.5, "64", True, None])
def test_max_bytes_must_be_a_non_negative_int(max_bytes):
    with pytest.raises(ValueError, match="max_bytes must be a non-negative int"):
        CaptureCarryover(max_bytes=max_bytes)


def _attribution():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padding="right")
    embeddings = model.get_input_embeddings()(inputs["input_ids"]).detach()
    return EfficientAttentionAttribution(forward_embeddings(model), model=model), embeddings, inputs


def test_attribution_keeps_the_last_capture_on_its_thread():
    attribution, embeddings, inputs = _attribution()
    mask = inputs["attention_mask"]
    release_thread_carryover()
    attribution.attribute(embeddings, target=0, additional_forward_args=(mask,))
    kept = thread_carryover().kept
    assert len(kept) == 3 * 3  # every layer and head of the tiny BERT
    seen = {}
    thread = threading.Thread(target=lambda: seen.update(kept=thread_carryover().kept))
    thread.start()
    thread.join()
    assert seen["kept"] == ()  # another thread's carryover is its own
    # ... and the scratch this thread concatenated the layers' values into: those of the layers
    # it projected itself (the pipeline's worker thread may have taken some: its own scratch).
    values = kept[2::3]  # each layer keeps its queries, keys and values, in that order
    kept_bytes = sum(t.numel() * t.element_size() for t in kept)
    released = release_thread_carryover()
    assert kept_bytes <= released <= kept_bytes + sum(t.numel() * t.element_size() for t in values)
    assert thread_carryover().kept == ()
    assert release_thread_carryover() == 0


def test_thread_scratch_reuses_its_memory():
    release_thread_carryover()
    first = thread_scratch((2, 3, 4), torch.float32, torch.device("cpu"))
    assert first is not None
    first.fill_(7.0)
    smaller = thread_scratch((5, 2), torch.float32, torch.device("cpu"))
    assert smaller is not None
    assert smaller.data_ptr() == first.data_ptr()  # the same memory, overwritten by its user
    larger = thread_scratch((100,), torch.float32, torch.device("cpu"))
    assert larger is not None
    assert larger.shape == (100,)
    assert thread_scratch((4,), torch.float64, torch.device("cpu")).dtype == torch.float64
    assert thread_scratch((4,), torch.float32, torch.device("meta")) is None
    too_big = CARRIED_BYTES // 4 + 1
    assert thread_scratch((too_big,), torch.float32, torch.device("cpu")) is None
    assert release_thread_carryover() == 4 * 8


def test_attributions_do_not_alias_the_reused_memory():
    attribution, embeddings, inputs = _attribution()
    mask = inputs["attention_mask"]

    def attribute(scale, view):
        return attribution.attribute(
            embeddings * scale, target=0, additional_forward_args=(mask,), view=view
        )

    for view in ("efficient", "effective", "raw"):
        first = attribute(1.0, view)
        kept = first.clone()
        other = attribute(-1.5, view)  # same shapes: the scratch is overwritten
        assert not torch.equal(other, kept)
        assert torch.equal(first, kept)
        assert torch.equal(attribute(1.0, view), kept)


def test_threads_attribute_side_by_side():
    attribution, embeddings, inputs = _attribution()
    mask = inputs["attention_mask"]
    scales = [1.0, -1.5, 0.5, 2.0]

    def attribute(scale):
        return attribution.attribute(embeddings * scale, target=0, additional_forward_args=(mask,))

    alone = [attribute(s) for s in scales]
    results: dict[int, list[torch.Tensor]] = {}
    start = threading.Barrier(len(scales))

    def run(index):
        start.wait()
        results[index] = [attribute(scales[index]) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(scales))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, expected in enumerate(alone):
        for got in results[index]:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
