"""The architecture registry finds each model's self-attention and reads its geometry."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import check_sufficiency
from captum_effattn.attr._views import get_view, project_captured, project_matrices
from captum_effattn.models import (
    ARCHITECTURES,
    UnsupportedModelError,
    capture_attention,
    describe_model,
    select_heads,
)
from tests.models.tiny import (
    ENCODER_DECODER_MODELS,
    HIDDEN,
    MORE_CAUSAL_MODELS,
    MORE_LAYERS,
    MORE_MODELS,
    NUM_HEADS,
    NUM_LAYERS,
    PATCH_SIZE,
    TINY_MODELS,
    VOCAB,
    WINDOW,
    WINDOWED_MODELS,
    tiny_inputs,
    tiny_model,
)

CLAIM_TOL = 1e-5  # relative logit change for float32 models

# Written out independently of the registry: where each tiny model keeps its attention modules.
ATTENTION_MODULES = {
    "bert": lambda base: [block.attention.self for block in base.encoder.layer],
    "roberta": lambda base: [block.attention.self for block in base.encoder.layer],
    "distilbert": lambda base: [block.attention for block in base.transformer.layer],
    "gpt2": lambda base: [block.attn for block in base.h],
    "llama": lambda base: [block.self_attn for block in base.layers],
    "vit": lambda base: [block.attention for block in base.layers],
    "electra": lambda base: [block.attention.self for block in base.encoder.layer],
    "xlm-roberta": lambda base: [block.attention.self for block in base.encoder.layer],
    "qwen2": lambda base: [block.self_attn for block in base.layers],
    "gemma": lambda base: [block.self_attn for block in base.layers],
    "phi3": lambda base: [block.self_attn for block in base.layers],
    "gpt_neox": lambda base: [block.attention for block in base.layers],
    "albert": lambda base: [base.encoder.albert_layer_groups[0].albert_layers[0].attention] * 2,
    "mistral": lambda base: [block.self_attn for block in base.layers],
    "modernbert": lambda base: [block.attn for block in base.layers],
    "t5": lambda base: [
        block.layer[0].SelfAttention for block in [*base.encoder.block, *base.decoder.block]
    ],
    "bart": lambda base: [
        block.self_attn for block in [*base.encoder.layers, *base.decoder.layers]
    ],
    "mbart": lambda base: [
        block.self_attn for block in [*base.encoder.layers, *base.decoder.layers]
    ],
}
# Key/value heads of the later tiny models (grouped-query attention where fewer than 4).
KV_HEADS = {"qwen2": 2, "gemma": 1, "phi3": 2, "mistral": 2}
INPUT_EMBEDDINGS = {
    "bert": lambda base: base.embeddings.word_embeddings,
    "roberta": lambda base: base.embeddings.word_embeddings,
    "distilbert": lambda base: base.embeddings.word_embeddings,
    "gpt2": lambda base: base.wte,
    "llama": lambda base: base.embed_tokens,
    "vit": lambda base: base.embeddings.patch_embeddings,
}


def test_every_tiny_model_is_registered():
    assert set(TINY_MODELS + MORE_MODELS) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("head", [True, False], ids=["head", "bare"])
def test_attention_modules_and_geometry(name, head):
    model = tiny_model(name, head=head)
    arch = describe_model(model)
    base = model.base_model
    expected = ATTENTION_MODULES[name](base)
    assert len(arch.attention_modules) == NUM_LAYERS
    assert all(a is b for a, b in zip(arch.attention_modules, expected, strict=True))
    assert arch.input_embeddings is INPUT_EMBEDDINGS[name](base)
    assert arch.model_class == type(model).__name__
    assert (arch.num_heads, arch.head_dim) == (NUM_HEADS, HIDDEN // NUM_HEADS)
    assert arch.num_kv_heads == (2 if name == "llama" else NUM_HEADS)
    assert arch.causal == (name in ("gpt2", "llama"))
    assert arch.spec.input_name == ("pixel_values" if name == "vit" else "input_ids")
    assert arch.spec.input_name == model.main_input_name
    assert arch.spec.embeds_name == (None if name == "vit" else "inputs_embeds")
    assert arch.spec.prepends_cls_token == (name == "vit")
    if name == "vit":
        assert arch.patch_size == (PATCH_SIZE, PATCH_SIZE)
        assert arch.image_size == (32, 32)
    else:
        assert arch.patch_size is None
        assert arch.image_size is None


def test_grouped_query_heads_map_to_their_key_value_head():
    arch = describe_model(tiny_model("llama"))
    assert arch.kv_group_size == 2
    assert [arch.kv_head(h) for h in range(NUM_HEADS)] == [0, 0, 1, 1]


def test_bert_as_a_decoder_is_causal():
    config = tf.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, is_decoder=True
    )
    assert describe_model(tf.BertModel(config)).causal
    config.is_decoder = False
    assert not describe_model(tf.BertModel(config)).causal


def test_unsupported_architecture_names_class_type_and_supported_ones():
    config = tf.CTRLConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    model = tf.CTRLLMHeadModel(config)
    with pytest.raises(UnsupportedModelError) as error:
        describe_model(model)
    message = str(error.value)
    assert "CTRLLMHeadModel" in message
    assert "'ctrl'" in message
    for supported in TINY_MODELS + MORE_MODELS:
        assert supported in message


def test_a_plain_torch_module_is_not_a_transformers_model():
    with pytest.raises(
        UnsupportedModelError, match="expected a transformers PreTrainedModel; got Linear"
    ):
        describe_model(torch.nn.Linear(2, 2))


def test_a_changed_layout_is_reported_not_guessed():
    model = tiny_model("bert")
    del model.bert.encoder.layer[1].attention.self
    with pytest.raises(UnsupportedModelError, match=r"no attention at 'attention.self'"):
        describe_model(model)


@pytest.mark.parametrize("name", MORE_MODELS)
@pytest.mark.parametrize("head", [True, False], ids=["head", "bare"])
def test_later_architectures_attention_modules_and_geometry(name, head):
    model = tiny_model(name, head=head)
    arch = describe_model(model)
    expected = ATTENTION_MODULES[name](model.base_model)
    assert len(arch.attention_modules) == MORE_LAYERS * (2 if name in ENCODER_DECODER_MODELS else 1)
    assert all(a is b for a, b in zip(arch.attention_modules, expected, strict=True))
    assert arch.input_embeddings is model.get_input_embeddings()
    assert (arch.num_heads, arch.head_dim) == (NUM_HEADS, HIDDEN // NUM_HEADS)
    assert arch.num_kv_heads == KV_HEADS.get(name, NUM_HEADS)
    assert arch.causal == (name in MORE_CAUSAL_MODELS)
    decoder = name in ENCODER_DECODER_MODELS
    assert arch.causal_layers == (False, False, True, True) if decoder else (arch.causal,) * 2
    assert arch.spec.input_name == model.main_input_name == "input_ids"


def _text_forward(name, model):
    """``forward(ids, mask) -> logits``; decoders get positions that skip left padding, the
    decoders of encoder-decoder classifiers the input's mask (so their last real row is the end
    of sequence token's, which the classifier reads)."""
    extra = {}

    def forward(ids, mask):
        if name in MORE_CAUSAL_MODELS:
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        if name in ENCODER_DECODER_MODELS:
            extra["decoder_attention_mask"] = mask
        return model(input_ids=ids, attention_mask=mask, **extra).logits

    return forward


@pytest.mark.parametrize("name", MORE_MODELS)
def test_later_architectures_attribute_and_reproduce_the_logits(name):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding="left" if name in MORE_CAUSAL_MODELS else "right")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    forward = _text_forward(name, model)
    if name in MORE_CAUSAL_MODELS:
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)

        def explained(ids, mask):
            return forward(ids, mask)[torch.arange(len(ids)), last]
    else:
        explained = forward
    # Encoder-decoder classifiers are explained by their decoder's layers (eos rows).
    layers = [2, 3] if name in ENCODER_DECODER_MODELS else None
    scores = EfficientAttentionAttribution(explained, model=model).attribute(
        ids, additional_forward_args=(mask,), layers=layers
    )
    assert scores.shape == ids.shape
    assert (scores[mask == 0] == 0).all()
    assert (scores >= 0).all()
    torch.testing.assert_close(scores.sum(-1), torch.ones(len(ids)), atol=1e-5, rtol=0)
    report = check_sufficiency(model, ids, (mask,), forward_func=forward)
    assert report.holds(CLAIM_TOL), report.relative_change
    raw = EfficientAttentionAttribution(explained, model=model).attribute(
        ids, additional_forward_args=(mask,), view="raw", layers=layers
    )
    assert (raw - scores).abs().max() > 1e-4  # 16 tokens over 8-wide heads: rows do move


def test_albert_runs_its_one_block_as_every_layer_and_each_run_is_captured():
    model = tiny_model("albert")
    inputs = tiny_inputs("albert", padding="right")
    with capture_attention(model, select_heads(model, layers=[1], heads=[0, 2])) as record:
        model(**inputs)
        model(**inputs)
    assert [[c.layer for c in call] for call in record.calls] == [[1], [1]]
    with capture_attention(model) as record:
        model(**inputs)
    first, second = record.layers
    assert (first.layer, second.layer) == (0, 1)
    # Same block, different inputs: the second run sees the first run's output.
    assert (first.attn - second.attn).abs().max() > 1e-3


@pytest.mark.parametrize("name", WINDOWED_MODELS)
def test_sliding_window_rows_are_projected_within_their_window(name):
    model = tiny_model(name)
    causal = name in MORE_CAUSAL_MODELS
    inputs = tiny_inputs(name, padding="left" if causal else "right")
    with torch.no_grad(), capture_attention(model) as record:
        model(**inputs)
    windowed = [c for c in record.layers if c.window is not None]
    assert [c.layer for c in windowed] == ([0, 1] if name in ("mistral", "phi3") else [1])
    keys = torch.arange(inputs["input_ids"].shape[1])
    real = inputs["attention_mask"].bool()
    distance = keys[:, None] - keys[None, :]  # query minus key
    expected = (distance.abs() < WINDOW) & real[:, None, :]
    if causal:
        expected &= distance >= 0
    efficient = get_view("efficient")
    for captured in windowed:
        assert captured.window == WINDOW
        visible = captured.visible_keys(keys)
        assert torch.equal(visible[real], expected[real])
        assert (captured.attn * ~visible[:, None]).abs().max() == 0
        rows, error = project_captured(captured, efficient)
        on_real = rows.transpose(1, 2)[real]  # (real queries, H, S)
        assert (on_real * ~visible[real][:, None]).abs().max() == 0
        assert (on_real >= 0).all()
        torch.testing.assert_close(on_real.sum(-1), torch.ones(on_real.shape[:2]))
        assert error.max() <= 1e-9
        assert (rows - captured.attn).abs().max() > 1e-3  # windows of 12 keys > d_head + 1
        # Ignoring the window would move mass onto keys the row cannot see.
        unwindowed, _ = project_matrices(
            captured.attn, captured.values, captured.key_mask, causal, efficient
        )
        assert (unwindowed.transpose(1, 2)[real] * ~visible[real][:, None]).abs().max() > 1e-3


def test_mistral_explanations_stay_within_the_last_rows_window():
    model = tiny_model("mistral")
    inputs = tiny_inputs("mistral", padding=None)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def last_logits(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits[:, -1]

    scores = EfficientAttentionAttribution(last_logits, model=model).attribute(
        ids, additional_forward_args=(mask,)
    )
    seen = ids.shape[1] - WINDOW
    assert (scores[:, :seen] == 0).all()
    torch.testing.assert_close(scores[:, seen:].sum(-1), torch.ones(len(ids)))


@pytest.mark.parametrize("name", ENCODER_DECODER_MODELS)
@pytest.mark.parametrize("materialize", [True, False], ids=["materialized", "lazy"])
def test_encoder_then_decoder_layers_match_eager_attention(name, materialize):
    """Layers 0-1 are the encoder's, 2-3 the decoder's causal self-attention; T5's relative
    position bias is in the captured probabilities (they match eager attention, which adds it)."""
    inputs = tiny_inputs(name, padding="right")
    inputs["decoder_attention_mask"] = inputs["attention_mask"]
    eager = tiny_model(name, "eager")
    with torch.no_grad():
        expected = eager(**inputs, output_attentions=True)
    model = tiny_model(name)
    with torch.no_grad(), capture_attention(model, materialize=materialize) as record:
        model(**inputs)
    captured = record.layers
    assert [c.causal for c in captured] == [False, False, True, True]
    real = inputs["attention_mask"].bool()
    for c, reference in zip(
        captured, [*expected.encoder_attentions, *expected.decoder_attentions], strict=True
    ):
        torch.testing.assert_close(
            c.attn.transpose(1, 2)[real],  # real query rows
            reference.transpose(1, 2)[real],
            atol=1e-6,
            rtol=0,
            msg=f"layer {c.layer}",
        )
    if name == "t5":
        assert captured[0].additive_mask is not None  # the position bias
        assert captured[0].probabilities is not None  # recorded even when not materializing


def test_encoder_and_decoder_layers_explain_separately():
    model = tiny_model("bart")
    inputs = tiny_inputs("bart", padding="right")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask, decoder_attention_mask=mask).logits

    explainer = EfficientAttentionAttribution(forward, model=model)
    for layers in ([0, 1], [2, 3]):
        scores = explainer.attribute(ids, additional_forward_args=(mask,), layers=layers)
        assert (scores[mask == 0] == 0).all()
        torch.testing.assert_close(scores.sum(-1), torch.ones(len(ids)))
    # The decoder's explaining row is the end-of-sequence token's, which sees every real token.
    decoder = explainer.attribute(ids, additional_forward_args=(mask,), layers=[3], view="raw")
    assert (decoder[mask == 1] > 0).all()


def test_deberta_v2_is_refused_with_the_reason():
    config = tf.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    )
    model = tf.DebertaV2ForSequenceClassification(config).eval()
    with pytest.raises(UnsupportedModelError) as error:
        describe_model(model)
    message = str(error.value)
    assert "DebertaV2ForSequenceClassification (model_type 'deberta-v2')" in message
    assert "DisentangledSelfAttention" in message
    assert "attention interface" in message
    assert "cannot be captured" in message


@pytest.fixture
def restore_registry():
    saved = dict(ARCHITECTURES)
    yield
    ARCHITECTURES.clear()
    ARCHITECTURES.update(saved)


def test_register_architecture_docstring_example_runs(restore_registry):
    import doctest

    from captum_effattn.models import architectures

    finder = doctest.DocTestFinder()
    (test,) = finder.find(architectures.register_architecture, "register_architecture")
    result = doctest.DocTestRunner(verbose=False).run(test)
    assert result.attempted >= 8
    assert result.failed == 0
    assert "my-bert" in ARCHITECTURES


def test_a_registered_variant_of_a_built_in_type_attributes_and_is_sufficient(restore_registry):
    import dataclasses

    from captum_effattn.models import register_architecture

    class VariantConfig(tf.BertConfig):
        model_type = "bert-variant"

    register_architecture(dataclasses.replace(ARCHITECTURES["bert"], model_type="bert-variant"))
    settings = tiny_model("bert").config.to_diff_dict()
    settings.pop("model_type", None)
    config = VariantConfig(**settings)
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config).eval()
    assert model.config.model_type == "bert-variant"
    assert describe_model(model).spec.model_type == "bert-variant"
    inputs = tiny_inputs("bert")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    scores = EfficientAttentionAttribution(forward, model=model).attribute(
        ids, additional_forward_args=(mask,)
    )
    torch.testing.assert_close(scores.sum(-1), torch.ones(len(ids)))
    assert check_sufficiency(model, ids, (mask,), forward_func=forward).holds(CLAIM_TOL)


def test_encoder_and_decoder_layers_together_keep_each_layers_causality():
    model = tiny_model("bart")
    inputs = tiny_inputs("bart", padding="right")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask, decoder_attention_mask=mask).logits

    per_head = EfficientAttentionAttribution(forward, model=model).attribute(
        ids, additional_forward_args=(mask,), reduce=None
    )  # (B, L, H, S) for the first token's row (the encoder's rule: layer 0 decides)
    assert per_head.shape == (2, 4, NUM_HEADS, ids.shape[1])
    # The decoder's row 0 sees only key 0: its efficient row is one-hot there.
    assert (per_head[:, 2:, :, 1:] == 0).all()
    torch.testing.assert_close(per_head[:, 2:, :, 0], torch.ones(2, 2, NUM_HEADS))
    assert (per_head[:, :2, :, 1:] > 0).any()
