"""capture_attention(buffers=...): the record holds copies in reused buffers, equal to what the
model computed, and attribution calls that use this thread's buffers neither alias nor disturb
each other's results."""

from __future__ import annotations

import threading

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.models import capture_attention, select_heads
from captum_effattn.models.buffers import CaptureBuffers, thread_buffers
from tests.attr.helpers import forward_embeddings
from tests.models.tiny import TINY_MODELS, tiny_inputs, tiny_model

TEXT_MODELS = tuple(name for name in TINY_MODELS if name != "vit")
SELECTION = {"layers": [0, 2], "heads": {2: [1, 3]}}


def _lazy_layers(model, inputs, selection, buffers=None):
    with (
        torch.no_grad(),
        capture_attention(model, selection, materialize=False, buffers=buffers) as record,
    ):
        model(**inputs)
    return record.layers


def _fields(captured):
    return (captured.values, captured.query, captured.key)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_the_copies_equal_the_model_tensors(name):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding="right")
    selection = select_heads(model, **SELECTION)
    buffers = CaptureBuffers()
    held = _lazy_layers(model, inputs, selection, buffers)
    own = _lazy_layers(model, inputs, selection)
    for copy, original in zip(held, own, strict=True):
        for a, b in zip(_fields(copy), _fields(original), strict=True):
            assert a.is_contiguous()
            assert torch.equal(a, b)
        assert torch.equal(copy.key_mask, original.key_mask)
        torch.testing.assert_close(copy.attn, original.attn, rtol=0, atol=0)
    assert buffers.nbytes == sum(
        t.numel() * t.element_size() for layer in own for t in _fields(layer)
    )


def test_the_next_capture_reuses_the_buffers():
    model = tiny_model("bert")
    selection = select_heads(model)
    buffers = CaptureBuffers()
    first = _lazy_layers(model, tiny_inputs("bert", padding="right"), selection, buffers)
    pointers = [t.data_ptr() for layer in first for t in _fields(layer)]
    second = _lazy_layers(model, tiny_inputs("bert", padding=None), selection, buffers)
    assert [t.data_ptr() for layer in second for t in _fields(layer)] == pointers
    # ... and a buffer whose shape no longer fits is replaced, not overrun.
    longer = tiny_inputs("bert", padding=None)
    longer = {k: torch.cat([v, v], dim=1) for k, v in longer.items()}
    third = _lazy_layers(model, longer, selection, buffers)
    assert third[0].values.shape[-2] == 2 * second[0].values.shape[-2]
    assert torch.equal(third[0].values, _lazy_layers(model, longer, selection)[0].values)


def test_beyond_max_bytes_the_model_tensors_are_recorded():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padding="right")
    selection = select_heads(model)
    buffers = CaptureBuffers(max_bytes=0)
    held = _lazy_layers(model, inputs, selection, buffers)
    assert buffers.nbytes == 0
    # The model's own (strided) views of its projections, not contiguous copies.
    assert not held[0].values.is_contiguous()


def test_buffers_refuse_keep_graph():
    model = tiny_model("bert")
    with (
        pytest.raises(ValueError, match="keep_graph=True or buffers"),
        capture_attention(model, keep_graph=True, buffers=CaptureBuffers()),
    ):
        pass


def test_tensors_in_a_graph_are_not_copied():
    buffers = CaptureBuffers()
    leaf = torch.ones(3, requires_grad=True)
    assert buffers.hold(leaf) is leaf
    assert buffers.hold(leaf.detach()) is not leaf
    assert buffers.nbytes == 3 * 4


def test_nested_blocks_get_no_buffers():
    with thread_buffers() as outer:
        assert isinstance(outer, CaptureBuffers)
        with thread_buffers() as inner:
            assert inner is None
    with thread_buffers() as again:
        assert again is outer  # released, and the same thread's


def _attribution():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padding="right")
    embeddings = model.get_input_embeddings()(inputs["input_ids"]).detach()
    return EfficientAttentionAttribution(forward_embeddings(model), model=model), embeddings, inputs


def test_attributions_do_not_alias_the_buffers():
    attribution, embeddings, inputs = _attribution()
    mask = inputs["attention_mask"]

    def attribute(scale):
        return attribution.attribute(embeddings * scale, target=0, additional_forward_args=(mask,))

    first = attribute(1.0)
    kept = first.clone()
    other = attribute(-1.5)  # same shapes: every buffer is overwritten
    assert not torch.equal(other, kept)
    assert torch.equal(first, kept)
    assert torch.equal(attribute(1.0), kept)


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
