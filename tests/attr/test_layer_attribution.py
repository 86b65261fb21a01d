"""LayerEfficientAttentionAttribution: the BERT tutorial flow with only the class name changed."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerAttribution
from captum.attr import visualization as viz

from captum_effattn import EfficientAttentionAttribution, LayerEfficientAttentionAttribution
from tests.models.tiny import HIDDEN, SEQ_LEN, tiny_inputs, tiny_model

model = None  # the notebook-style global the tutorial's `predict` reads


def predict(inputs, token_type_ids=None, position_ids=None, attention_mask=None):
    return model(
        inputs,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
    )


def tutorial_forward(inputs, token_type_ids=None, position_ids=None, attention_mask=None):
    pred = predict(
        inputs,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
    )
    return pred[0].max(1).values


@pytest.fixture
def bert():
    global model
    model = tiny_model("bert")
    yield model
    model = None


@pytest.fixture
def tutorial_args():
    inputs = tiny_inputs("bert")
    ids = inputs["input_ids"]
    token_types = torch.zeros_like(ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return ids, (token_types, positions, inputs["attention_mask"])


def test_tutorial_code_runs_with_the_class_name_changed(bert, tutorial_args):
    input_ids, extra = tutorial_args
    ref_input_ids = torch.zeros_like(input_ids)
    lig = LayerEfficientAttentionAttribution(tutorial_forward, bert.bert.embeddings)
    assert isinstance(lig, LayerAttribution)
    assert lig.model is bert  # found through predict's global
    attributions, delta = lig.attribute(
        inputs=input_ids,
        baselines=ref_input_ids,
        additional_forward_args=extra,
        target=None,
        return_convergence_delta=True,
    )
    assert attributions.shape == (2, SEQ_LEN, HIDDEN)
    assert attributions.is_contiguous()
    assert delta.shape == (2,)
    assert float(delta.max()) < 1e-6
    expected = EfficientAttentionAttribution(tutorial_forward, model=bert).attribute(
        input_ids, additional_forward_args=extra
    )
    torch.testing.assert_close(attributions.sum(dim=-1), expected, atol=1e-6, rtol=0)
    scores = attributions[:1].sum(dim=-1).squeeze(0)
    assert scores.shape == (SEQ_LEN,)
    # mass 1 over the real tokens of the [CLS] row, spread evenly over the features
    assert float(scores.sum()) == pytest.approx(1, abs=1e-5)
    assert torch.allclose(attributions[0], attributions[0, :, :1].expand(-1, HIDDEN))
    record = viz.VisualizationDataRecord(
        scores, 0.9, 1, 1, "1", scores.sum(), [str(i) for i in range(SEQ_LEN)], delta[0]
    )
    assert record.word_attributions.shape == (SEQ_LEN,)


def test_options_are_those_of_efficient_attention(bert, tutorial_args):
    ids, extra = tutorial_args
    lig = LayerEfficientAttentionAttribution(tutorial_forward, bert.bert.embeddings, model=bert)
    reference = EfficientAttentionAttribution(tutorial_forward, model=bert)
    for options in ({"layers": -1, "heads": [0, 2], "view": "raw"}, {"view": "effective"}):
        attributions = lig.attribute(ids, additional_forward_args=extra, **options)
        expected = reference.attribute(ids, additional_forward_args=extra, **options)
        torch.testing.assert_close(attributions.sum(-1), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reduce=None"):
        lig.attribute(ids, additional_forward_args=extra, reduce=None)
    with pytest.raises(ValueError, match="view"):
        lig.attribute(ids, additional_forward_args=extra, view="nope")


def test_layer_input_and_convergence_delta(bert, tutorial_args):
    ids, extra = tutorial_args
    lig = LayerEfficientAttentionAttribution(tutorial_forward, bert.bert.embeddings)
    on_input = lig.attribute(ids, additional_forward_args=extra, attribute_to_layer_input=True)
    assert on_input.shape == ids.shape  # the embeddings receive the token ids
    on_output = lig.attribute(ids, additional_forward_args=extra)
    # LayerIntegratedGradients' argument order and settings are accepted (and unused)
    positional = lig.attribute(ids, torch.zeros_like(ids), 1, extra, 500, "gausslegendre", 4)
    torch.testing.assert_close(positional, on_output)
    torch.testing.assert_close(on_input, on_output.sum(-1), atol=1e-6, rtol=0)
    assert lig.has_convergence_delta()
    delta = lig.compute_convergence_delta(on_output, ids, additional_forward_args=extra)
    assert delta.shape == (2,)
    assert float(delta.max()) < 1e-6


def test_model_as_forward_func():
    bert = tiny_model("bert")
    inputs = tiny_inputs("bert")
    lig = LayerEfficientAttentionAttribution(bert, bert.bert.embeddings)
    assert lig.model is bert
    mask = (inputs["attention_mask"],)
    attributions = lig.attribute(inputs["input_ids"], additional_forward_args=mask)
    expected = EfficientAttentionAttribution(bert).attribute(
        inputs["input_ids"], additional_forward_args=mask
    )
    torch.testing.assert_close(attributions.sum(-1), expected, atol=1e-6, rtol=0)
    assert float(attributions[1, -5:].abs().sum()) == 0  # padding gets nothing


def test_decoder_embeddings():
    gpt2 = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", padding="left")

    def forward(ids, mask):
        return gpt2(input_ids=ids, attention_mask=mask).logits[:, -1]

    lig = LayerEfficientAttentionAttribution(forward, gpt2.transformer.wte)
    mask = (inputs["attention_mask"],)
    attributions = lig.attribute(inputs["input_ids"], additional_forward_args=mask)
    expected = EfficientAttentionAttribution(forward, model=gpt2).attribute(
        inputs["input_ids"], additional_forward_args=mask
    )
    assert attributions.shape == (2, SEQ_LEN, HIDDEN)
    torch.testing.assert_close(attributions.sum(-1), expected, atol=1e-6, rtol=0)
    assert float(attributions[1, :5].abs().sum()) == 0  # left padding gets nothing


def test_closure_model_is_found():
    bert = tiny_model("bert")
    inputs = tiny_inputs("bert")

    def forward(ids, mask):
        return bert(input_ids=ids, attention_mask=mask).logits

    lig = LayerEfficientAttentionAttribution(forward, bert.bert.embeddings)
    assert lig.model is bert
    out = lig.attribute(inputs["input_ids"], additional_forward_args=(inputs["attention_mask"],))
    assert out.shape == (2, SEQ_LEN, HIDDEN)


def test_model_found_in_a_callable_object():
    bert = tiny_model("bert")

    class Forward:
        def __init__(self, network):
            self.network = network

        def __call__(self, ids):
            return self.network(input_ids=ids).logits

    assert LayerEfficientAttentionAttribution(Forward(bert), bert.bert.embeddings).model is bert


def test_bad_layers_and_models(bert, tutorial_args):
    ids, extra = tutorial_args
    other = tiny_model("bert", seed=1)
    with pytest.raises(ValueError, match="BertEmbeddings is not a submodule of the model"):
        LayerEfficientAttentionAttribution(tutorial_forward, other.bert.embeddings, model=bert)
    with pytest.raises(ValueError, match="not a submodule of the model forward_func uses"):
        LayerEfficientAttentionAttribution(tutorial_forward, other.bert.embeddings)
    with pytest.raises(TypeError, match="pass model="):
        LayerEfficientAttentionAttribution(lambda x: x, torch.nn.Linear(2, 2))
    classifier = LayerEfficientAttentionAttribution(tutorial_forward, bert.classifier)
    with pytest.raises(ValueError, match=r"not aligned with the inputs"):
        classifier.attribute(ids, additional_forward_args=extra)
    bert.unused = torch.nn.Linear(2, 2).eval()  # a submodule the forward never calls
    try:
        unused = LayerEfficientAttentionAttribution(tutorial_forward, bert.unused)
        with pytest.raises(ValueError, match="Linear did not run during forward_func"):
            unused.attribute(ids, additional_forward_args=extra)
    finally:
        del bert.unused
