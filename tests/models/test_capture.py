"""capture_attention on tiny random models of every supported architecture, sdpa and eager."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from captum_effattn.models import capture_attention, describe_model, select_heads
from tests.models.references import (
    EfficientSubstitution,
    eager_attentions,
    hooked_values,
    mixed_with_uniform,
    relative_change,
    rows_with_keys,
)
from tests.models.tiny import (
    CAUSAL_MODELS,
    NUM_HEADS,
    NUM_LAYERS,
    TINY_MODELS,
    tiny_inputs,
    tiny_model,
)

IMPLEMENTATIONS = ("sdpa", "eager")
TEXT_MODELS = tuple(name for name in TINY_MODELS if name != "vit")
# Every text model with right padding; causal models also with left padding (padding queries
# before the first real token then see no key at all).
PADDINGS = [(name, "right") for name in TEXT_MODELS] + [(name, "left") for name in CAUSAL_MODELS]


def output_of(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def real_positions(inputs, logits):
    """Token-level outputs at real tokens only (padding positions may legitimately differ)."""
    mask = inputs.get("attention_mask")
    if mask is None or logits.dim() < 3:
        return logits
    return logits[mask.bool()]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    return request.param


@pytest.mark.parametrize(("name", "padding"), [*PADDINGS, ("vit", None)])
def test_probabilities_equal_eager_output_attentions(name, padding, implementation):
    model = tiny_model(name, implementation)
    inputs = tiny_inputs(name, padding=padding)
    with torch.no_grad(), capture_attention(model) as record:
        model(**inputs)
    reference = eager_attentions(model, inputs)
    for captured, expected in zip(record.layers, reference, strict=True):
        assert captured.heads == tuple(range(NUM_HEADS))
        assert captured.attn.dtype == torch.float32
        rows = rows_with_keys(captured.key_mask, captured.causal)
        torch.testing.assert_close(captured.attn * rows, expected * rows, rtol=0, atol=1e-6)
        # Rows that see no key (left padding, causal) are all zero.
        assert (captured.attn * ~rows == 0).all()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_values_equal_the_value_projection(name, implementation):
    model = tiny_model(name, implementation)
    inputs = tiny_inputs(name)
    selection = select_heads(model, layers=[0, 2], heads={2: [1, 3]})
    with torch.no_grad(), capture_attention(model, selection) as record:
        model(**inputs)
    values = hooked_values(model, inputs)
    arch = describe_model(model)
    for captured in record.layers:
        kv_heads = [arch.kv_head(h) for h in captured.heads]
        assert captured.kv_heads == tuple(kv_heads)
        torch.testing.assert_close(
            captured.values, values[captured.layer][:, kv_heads], rtol=1e-5, atol=1e-5
        )
    first, last = record.layers
    assert (first.layer, first.heads, last.layer, last.heads) == (0, (0, 1, 2, 3), 2, (1, 3))
    seq = 17 if name == "vit" else 16  # ViT: [CLS] + 16 patches
    assert last.attn.shape == (2, 2, seq, seq)
    assert last.values.shape == (2, 2, seq, 8)


def test_grouped_query_heads_share_their_values():
    model = tiny_model("llama")
    with torch.no_grad(), capture_attention(model) as record:
        model(**tiny_inputs("llama"))
    for captured in record.layers:
        assert captured.kv_heads == (0, 0, 1, 1)
        assert torch.equal(captured.values[:, 0], captured.values[:, 1])
        assert torch.equal(captured.values[:, 2], captured.values[:, 3])
        assert not torch.equal(captured.values[:, 1], captured.values[:, 2])


@pytest.mark.parametrize(("name", "padding"), [*PADDINGS, ("vit", None)])
def test_capture_leaves_the_output_unchanged(name, padding, implementation):
    model = tiny_model(name, implementation)
    inputs = tiny_inputs(name, padding=padding)
    with torch.no_grad():
        plain = output_of(model, inputs)
        with capture_attention(model):
            captured = output_of(model, inputs)
        with capture_attention(model, transform=lambda c: c.attn):
            identity = output_of(model, inputs)
    for logits in (captured, identity):
        change = relative_change(real_positions(inputs, logits), real_positions(inputs, plain))
        assert change <= 2e-6
    if implementation == "sdpa":  # sdpa also gives padding queries that see no key a zero output
        assert relative_change(captured, plain) <= 2e-6


@pytest.mark.parametrize(("name", "padding"), PADDINGS)
def test_key_mask_marks_the_real_tokens(name, padding):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding=padding)
    with torch.no_grad(), capture_attention(model) as record:
        model(**inputs)
    for captured in record.layers:
        assert captured.key_mask.dtype == torch.bool
        assert torch.equal(captured.key_mask, inputs["attention_mask"].bool())
        assert captured.causal == (name in CAUSAL_MODELS)
        pad = ~captured.key_mask[:, None, None, :]
        assert (captured.attn * pad == 0).all()


def test_key_mask_of_images_is_all_real():
    model = tiny_model("vit")
    with torch.no_grad(), capture_attention(model) as record:
        model(**tiny_inputs("vit"))
    assert all(c.key_mask.all() and c.key_mask.shape == (2, 17) for c in record.layers)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_embeddings_as_input_give_the_same_capture(name):
    # RoBERTa numbers positions from the ids, skipping padding, and sequentially from embeddings:
    # only padding positions differ, so compare the rows of real queries.
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    embeds = describe_model(model).input_embeddings(inputs["input_ids"])
    by_embeds = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    with torch.no_grad(), capture_attention(model) as from_ids:
        model(**inputs)
    with torch.no_grad(), capture_attention(model) as from_embeds:
        model(**by_embeds)
    for a, b in zip(from_ids.layers, from_embeds.layers, strict=True):
        assert torch.equal(a.key_mask, b.key_mask)
        real_rows = a.key_mask  # (B, S): queries at real tokens
        torch.testing.assert_close(
            a.attn.transpose(1, 2)[real_rows], b.attn.transpose(1, 2)[real_rows], rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("name", TINY_MODELS)
def test_efficient_attention_leaves_the_output_unchanged(name, implementation):
    model = tiny_model(name, implementation)
    inputs = tiny_inputs(name, padding=None if name in CAUSAL_MODELS else "right")
    efficient = EfficientSubstitution()
    with torch.no_grad():
        plain = output_of(model, inputs)
        with capture_attention(model, transform=efficient):
            substituted = output_of(model, inputs)
    assert relative_change(substituted, plain) <= 1e-5
    # The substitution is not vacuous: 16 keys > d_head + 1 = 9, so rows do move.
    assert efficient.moved > 0.05


@pytest.mark.parametrize(("name", "padding"), [*PADDINGS, ("vit", None)])
def test_perturbed_attention_changes_the_output(name, padding):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding=padding)

    def perturbed(captured):
        return mixed_with_uniform(captured.attn, captured.key_mask, captured.causal)

    with torch.no_grad():
        plain = output_of(model, inputs)
        with capture_attention(model, transform=perturbed):
            changed = output_of(model, inputs)
    assert relative_change(real_positions(inputs, changed), real_positions(inputs, plain)) > 1e-2


def test_transform_replaces_only_the_selected_heads():
    model = tiny_model("llama", "eager")
    inputs = tiny_inputs("llama")
    selection = select_heads(model, layers=1, heads=[1, 3])
    seen = []

    def zero(captured):
        seen.append((captured.layer, captured.heads, tuple(captured.attn.shape)))
        return torch.zeros_like(captured.attn)

    with torch.no_grad():
        with capture_attention(model, selection) as original:
            model(**inputs)
        with capture_attention(model, selection, transform=zero):
            # Eager-style modules return the probabilities they applied.
            applied = model(**inputs, output_attentions=True).attentions[0]
    assert seen == [(1, (1, 3), (2, 2, 16, 16))]
    assert (applied[:, [1, 3]] == 0).all()
    reference = eager_attentions(model, inputs)[1]
    torch.testing.assert_close(applied[:, [0, 2]], reference[:, [0, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(original.layers[0].attn, reference[:, [1, 3]], rtol=0, atol=1e-6)


def test_a_transform_of_the_wrong_shape_names_the_layer():
    model = tiny_model("bert")
    with (
        pytest.raises(ValueError, match=r"shape \(2, 4, 16, 16\) .* for layer 0; got \(2, 4, 16\)"),
        capture_attention(model, transform=lambda c: c.attn[..., 0]),
    ):
        model(**tiny_inputs("bert"))


def test_bert_as_a_decoder_is_captured_causally():
    config = tf.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        is_decoder=True,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = tf.BertModel(config).eval()
    inputs = tiny_inputs("bert", padding=None)
    with torch.no_grad(), capture_attention(model) as record:
        model(**inputs)
    reference = eager_attentions(model, inputs)
    for captured, expected in zip(record.layers, reference, strict=True):
        assert captured.causal
        assert (captured.attn.triu(1) == 0).all()
        torch.testing.assert_close(captured.attn, expected, rtol=0, atol=1e-6)


def test_a_custom_mask_that_is_not_padding_is_refused():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padding=None)
    banded = torch.ones(16, 16, dtype=torch.bool).triu(-2).tril(2).expand(2, 1, 16, 16)
    with (
        pytest.raises(ValueError, match=r"attention mask of layer 0 .* is not a padding mask"),
        capture_attention(model),
    ):
        model(input_ids=inputs["input_ids"], attention_mask=banded)


def test_a_mask_changed_in_place_between_forwards_is_read_again():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padding=None)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    with torch.no_grad(), capture_attention(model) as record:
        model(input_ids=inputs["input_ids"], attention_mask=mask)
        mask[1, ..., 12:] = False  # the same tensor, now padding the second example's last keys
        model(input_ids=inputs["input_ids"], attention_mask=mask)
    first, second = record.calls
    assert all(c.key_mask.all() for c in first)
    expected = mask[:, 0, 0]
    assert all(torch.equal(c.key_mask, expected) for c in second)
    assert all(c.attn[1, :, :, 12:].abs().max() == 0 for c in second)


def test_gradients_flow_as_without_capture():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    embeds = describe_model(model).input_embeddings(inputs["input_ids"]).detach()

    def gradient():
        x = embeds.clone().requires_grad_()
        model(inputs_embeds=x, attention_mask=inputs["attention_mask"]).logits[
            :, 0
        ].sum().backward()
        return x.grad

    plain = gradient()
    with capture_attention(model) as record:
        captured = gradient()
    assert relative_change(captured, plain) <= 1e-5
    assert not any(c.attn.requires_grad or c.values.requires_grad for c in record.layers)


def test_keep_graph_keeps_the_recorded_tensors_differentiable():
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2")
    embeds = describe_model(model).input_embeddings(inputs["input_ids"]).detach().requires_grad_()
    with capture_attention(model, select_heads(model, layers=1), keep_graph=True) as record:
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    (captured,) = record.layers
    (captured.attn[:, :, -1, 0].sum() + captured.values.sum()).backward()
    assert embeds.grad is not None
    assert embeds.grad.abs().sum() > 0


def test_several_forward_passes_are_recorded_separately():
    model = tiny_model("distilbert")
    inputs = tiny_inputs("distilbert")
    selection = select_heads(model, layers=[0, 2])
    with torch.no_grad(), capture_attention(model, selection) as record:
        model(**inputs)
        model(input_ids=inputs["input_ids"][:1])
    assert [[c.layer for c in call] for call in record.calls] == [[0, 2], [0, 2]]
    assert [call[0].attn.shape[0] for call in record.calls] == [2, 1]
    with pytest.raises(RuntimeError, match="ran 2 forward passes inside capture_attention"):
        _ = record.layers
    with capture_attention(model) as empty:
        pass
    with pytest.raises(RuntimeError, match="ran no forward pass"):
        _ = empty.layers


def test_training_mode_is_refused_with_the_fix():
    model = tiny_model("bert").train()
    with (
        pytest.raises(RuntimeError, match=r"in training mode.*Call model\.eval\(\) first"),
        capture_attention(model),
    ):
        pass
    assert model.training
    model.eval()
    model.bert.encoder.layer[1].attention.self.train()
    with (
        pytest.raises(RuntimeError, match=r"submodule 'bert\.encoder\.layer\.1\.attention\.self'"),
        capture_attention(model),
    ):
        pass


def test_a_selection_for_another_model_is_refused():
    selection = select_heads(tiny_model("bert"), layers=0)
    model = tiny_model("bert")
    model.bert.encoder.layer = model.bert.encoder.layer[:2]
    with (
        pytest.raises(
            ValueError, match=r"made for a model with 3 layers of 4 heads.* has 2 layers"
        ),
        capture_attention(model, selection),
    ):
        pass


def test_nested_captures_of_one_model_are_refused():
    model = tiny_model("bert")
    with capture_attention(model):
        with (
            pytest.raises(RuntimeError, match="already under capture_attention"),
            capture_attention(model),
        ):
            pass
        with torch.no_grad():
            model(**tiny_inputs("bert"))
    other = tiny_model("gpt2")
    with torch.no_grad(), capture_attention(model) as a, capture_attention(other) as b:
        model(**tiny_inputs("bert"))
        other(**tiny_inputs("gpt2"))
    assert len(a.layers) == len(b.layers) == NUM_LAYERS


def model_state(model):
    """Everything a capture could leave behind: implementations, hooks, modes, grad mode."""
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    return {
        "implementations": [
            (name, m.config._attn_implementation)
            for name, m in model.named_modules()
            if hasattr(m, "config")
        ],
        "hooks": [
            (name, attr, dict(getattr(m, attr)))
            for name, m in model.named_modules()
            for attr in hook_dicts
        ],
        "global_hooks": (
            dict(torch.nn.modules.module._global_forward_hooks),
            dict(torch.nn.modules.module._global_forward_pre_hooks),
            dict(torch.nn.modules.module._global_backward_hooks),
        ),
        "training": [m.training for m in model.modules()],
        "grad": torch.is_grad_enabled(),
    }


class Boom(Exception):
    pass


def _raise_in_body(model, inputs):
    with capture_attention(model):
        model(**inputs)
        raise Boom


def _raise_in_forward(model, inputs):
    def transform(captured):
        raise Boom

    with capture_attention(model, transform=transform):
        model(**inputs)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_the_model_comes_back_as_it_was(name, implementation, grad):
    model = tiny_model(name, implementation)
    inputs = tiny_inputs(name)
    model.get_input_embeddings().register_forward_hook(lambda *args: None)  # a user's hook
    with torch.set_grad_enabled(grad):
        before = model_state(model)
        assert before["implementations"][0][1] == implementation
        with capture_attention(model):
            assert model.config._attn_implementation != implementation
            model(**inputs)
        assert model_state(model) == before
        for fail in (_raise_in_body, _raise_in_forward):
            with pytest.raises(Boom):
                fail(model, inputs)
            assert model_state(model) == before
        assert torch.is_grad_enabled() == grad
    # And the model still computes what it computed before.
    with torch.no_grad():
        again = output_of(model, inputs)
        fresh = output_of(tiny_model(name, implementation), inputs)
    assert torch.equal(again, fresh)


@pytest.mark.parametrize("name", CAUSAL_MODELS)
def test_a_cached_decoding_step_is_captured(name):
    """One new query over 16 keys (15 cached): the causal mask is offset, padding still read."""
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding="left")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    step = {"input_ids": ids[:, -1:], "attention_mask": mask}

    def prefix_cache():
        with torch.no_grad():
            return model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).cache

    cache = prefix_cache()
    with torch.no_grad(), capture_attention(model) as record:
        model(**step, cache=cache)
    reference = eager_attentions(model, {**step, "cache": prefix_cache()})
    for captured, expected in zip(record.layers, reference, strict=True):
        assert captured.attn.shape == (2, NUM_HEADS, 1, 16)
        assert torch.equal(captured.key_mask, mask.bool())
        torch.testing.assert_close(captured.attn, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize(("name", "padding"), [("bert", "right"), ("llama", "left")])
def test_an_identity_output_hook_leaves_the_output_unchanged(name, padding, materialize):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding=padding)
    seen = []

    def hook(captured, outputs):
        seen.append((captured.layer, tuple(outputs.shape)))
        return outputs

    with torch.no_grad():
        plain = output_of(model, inputs)
        with capture_attention(model, materialize=materialize, on_output=hook):
            hooked = output_of(model, inputs)
    change = relative_change(real_positions(inputs, hooked), real_positions(inputs, plain))
    assert change <= 2e-6
    batch, length = inputs["input_ids"].shape
    head_dim = model.config.hidden_size // NUM_HEADS
    assert seen == [(layer, (batch, NUM_HEADS, length, head_dim)) for layer in range(NUM_LAYERS)]


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_head_output_gradients_give_the_attention_gradient(name):
    """d y / d A from offsets on the head outputs (fast attention kept) equals the gradient
    through offsets added to the materialized probabilities themselves."""
    from captum_effattn.attr._weightings import attention_gradient, output_offsets

    model = tiny_model(name)
    inputs = tiny_inputs(name, padding="right")
    selection = select_heads(model, layers=[0, 1], heads=[1, 3])
    attention_offsets = []

    def add_to_attention(captured):
        attention_offsets.append(torch.zeros_like(captured.attn, requires_grad=True))
        return captured.attn + attention_offsets[-1]

    with capture_attention(model, selection, add_to_attention):
        expected = torch.autograd.grad(output_of(model, inputs)[:, 0].sum(), attention_offsets)
    offsets, add_offset = output_offsets()
    with capture_attention(model, selection, materialize=False, on_output=add_offset) as record:
        outputs = torch.autograd.grad(output_of(model, inputs)[:, 0].sum(), offsets)
    for captured, output, reference in zip(record.layers, outputs, expected, strict=True):
        got = attention_gradient(captured, output)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)


def test_an_output_hook_of_the_wrong_shape_names_the_layer():
    model = tiny_model("bert")
    with (
        pytest.raises(ValueError, match=r"on_output must return .* for layer 0; got \(2, 4, 16\)"),
        torch.no_grad(),
        capture_attention(model, materialize=False, on_output=lambda c, o: o[..., 0]),
    ):
        model(**tiny_inputs("bert"))
