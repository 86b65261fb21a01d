"""``capture_attention(stop_early=True)`` ends the pass at the last selected layer: nothing after it
runs, the record is what a whole pass records, and the model comes back as it was."""

from __future__ import annotations

import pytest
import torch

from captum_effattn.models import _interface, capture_attention, select_heads
from tests.models.tiny import tiny_inputs, tiny_model


def _calls_of(module: torch.nn.Module, counts: dict[str, int], name: str):
    counts[name] = 0

    def count(*_):
        counts[name] += 1

    return module.register_forward_hook(count)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("layers", [[0], [0, 1], "all"])
def test_stopped_pass_records_what_a_whole_pass_records(name, layers):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding="right")
    selection = select_heads(model, layers=layers)
    with torch.no_grad(), capture_attention(model, selection, materialize=False) as whole:
        model(**inputs)
    with (
        torch.no_grad(),
        capture_attention(model, selection, materialize=False, stop_early=True) as stopped,
    ):
        model(**inputs)
    assert stopped.stopped
    assert not whole.stopped
    assert [c.layer for c in stopped.layers] == list(selection.layers)
    for early, full in zip(stopped.layers, whole.layers, strict=True):
        assert torch.equal(early.attn, full.attn)
        assert torch.equal(early.values, full.values)
        assert torch.equal(early.key_mask, full.key_mask)
        sums = early.attn.sum(-1)[early.key_mask[:, None, :].expand_as(early.attn[..., 0])]
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_nothing_after_the_last_selected_layer_runs(name):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding="right")
    blocks = model.bert.encoder.layer if name == "bert" else model.transformer.h
    counts: dict[str, int] = {}
    handles = [_calls_of(block, counts, f"block {i}") for i, block in enumerate(blocks)]
    handles.append(_calls_of(model.lm_head if name == "gpt2" else model.classifier, counts, "head"))
    after_block = []
    try:
        with (
            torch.no_grad(),
            capture_attention(model, select_heads(model, layers=[1]), stop_early=True),
        ):
            model(**inputs)
            after_block.append("ran")  # the rest of the block is skipped
    finally:
        for handle in handles:
            handle.remove()
    # Block 0 ran whole; block 1 stopped inside its attention; block 2 and the head never ran.
    assert counts == {"block 0": 1, "block 1": 0, "block 2": 0, "head": 0}
    assert after_block == []


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_model_is_left_as_it_came():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padding="right")
    implementation = model.config._attn_implementation
    hooks = _hook_count(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        with capture_attention(model, stop_early=True) as record:
            model(**inputs)
        assert record.stopped
        assert model.config._attn_implementation == implementation
        assert not _interface.active_taps()
        assert _hook_count(model) == hooks
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
        # and it can be captured again, whole
        with capture_attention(model) as again:
            model(**inputs)
    assert not again.stopped
    assert len(again.layers) == len(record.layers)


def test_an_except_exception_in_the_forward_does_not_swallow_the_stop():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padding="right")
    caught = []

    def careful_forward():
        try:
            return model(**inputs).logits
        except Exception as error:  # what user code around a model call often does
            caught.append(error)
            return None

    with torch.no_grad(), capture_attention(model, stop_early=True) as record:
        careful_forward()
    assert record.stopped
    assert caught == []


def test_errors_raised_in_the_stopped_pass_still_propagate():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padding="right")

    def fail(captured):
        raise ValueError(f"layer {captured.layer} rejected")

    with (
        pytest.raises(ValueError, match="layer 0 rejected"),
        torch.no_grad(),
        capture_attention(model, materialize=False, on_layer=fail, stop_early=True),
    ):
        model(**inputs)
    assert not _interface.active_taps()


@pytest.mark.parametrize("option", ["transform", "on_output"])
def test_stop_early_refuses_what_acts_on_outputs(option):
    model = tiny_model("bert")
    kwargs = {
        "transform": {"transform": lambda captured: captured.attn},
        "on_output": {"on_output": lambda captured, outputs: outputs, "materialize": False},
    }[option]
    with (
        pytest.raises(ValueError, match="stop_early=True"),
        capture_attention(model, stop_early=True, **kwargs),
    ):
        pass


@pytest.mark.parametrize(("name", "layers"), [("bart", [0]), ("bart", [1, 2]), ("t5", [3])])
def test_encoder_decoders_stop_in_the_stack_of_the_last_selected_layer(name, layers):
    """Layers count the encoder's first: a selection within the encoder never runs the decoder."""
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding="right")
    if name == "t5":
        inputs["decoder_input_ids"] = inputs["input_ids"]
    decoder = model.get_decoder()
    runs = {"decoder": 0}

    def count(*_):
        runs["decoder"] += 1

    selection = select_heads(model, layers=layers)
    with torch.no_grad(), capture_attention(model, selection, materialize=False) as whole:
        model(**inputs)
    handle = decoder.register_forward_pre_hook(count)
    try:
        with (
            torch.no_grad(),
            capture_attention(model, selection, materialize=False, stop_early=True) as stopped,
        ):
            model(**inputs)
    finally:
        handle.remove()
    assert stopped.stopped
    assert runs["decoder"] == (1 if max(layers) >= 2 else 0)
    for early, full in zip(stopped.layers, whole.layers, strict=True):
        assert early.layer == full.layer
        assert torch.equal(early.attn, full.attn)


def test_a_block_shared_by_every_layer_stops_at_the_selected_run():
    """ALBERT runs one attention module as every layer: the stop comes at the selected run."""
    model = tiny_model("albert")
    inputs = tiny_inputs("albert", padding="right")
    with torch.no_grad(), capture_attention(model, materialize=False) as whole:
        model(**inputs)
    first = select_heads(model, layers=[0])
    with (
        torch.no_grad(),
        capture_attention(model, first, materialize=False, stop_early=True) as stopped,
    ):
        model(**inputs)
    assert stopped.stopped
    assert [c.layer for c in stopped.layers] == [0]
    assert torch.equal(stopped.layers[0].attn, whole.layers[0].attn)
