"""The architecture registry finds each model's self-attention and reads its geometry."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from captum_effattn.models import ARCHITECTURES, UnsupportedModelError, describe_model
from tests.models.tiny import HIDDEN, NUM_HEADS, NUM_LAYERS, PATCH_SIZE, TINY_MODELS, tiny_model

# Written out independently of the registry: where each tiny model keeps its attention modules.
ATTENTION_MODULES = {
    "bert": lambda base: [block.attention.self for block in base.encoder.layer],
    "roberta": lambda base: [block.attention.self for block in base.encoder.layer],
    "distilbert": lambda base: [block.attention for block in base.transformer.layer],
    "gpt2": lambda base: [block.attn for block in base.h],
    "llama": lambda base: [block.self_attn for block in base.layers],
    "vit": lambda base: [block.attention for block in base.layers],
}
INPUT_EMBEDDINGS = {
    "bert": lambda base: base.embeddings.word_embeddings,
    "roberta": lambda base: base.embeddings.word_embeddings,
    "distilbert": lambda base: base.embeddings.word_embeddings,
    "gpt2": lambda base: base.wte,
    "llama": lambda base: base.embed_tokens,
    "vit": lambda base: base.embeddings.patch_embeddings,
}


def test_every_tiny_model_is_registered():
    assert set(TINY_MODELS) == set(ARCHITECTURES)


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
    config = tf.AlbertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    model = tf.AlbertForSequenceClassification(config)
    with pytest.raises(UnsupportedModelError) as error:
        describe_model(model)
    message = str(error.value)
    assert "AlbertForSequenceClassification" in message
    assert "'albert'" in message
    for supported in TINY_MODELS:
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
