"""The token gate: a real (tiny, random-weight) BERT classifier as a function of one float per
token, in which every Captum method runs unchanged and returns (B, S)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients, Saliency

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.metrics import TokenGate, gated_inputs, standard_methods
from tests.models.tiny import tiny_inputs, tiny_model

PAD = 0


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


@pytest.fixture(scope="module")
def batch():
    return tiny_inputs("bert", padding="right")


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_the_all_ones_gate_is_the_real_input(bert, batch):
    gate = TokenGate(bert, baseline_token_id=PAD)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        gated = gate(torch.ones(ids.shape), ids, mask)
    torch.testing.assert_close(gated, logits(bert, ids, mask), rtol=1e-5, atol=1e-6)


def test_a_zero_gate_replaces_the_token_by_the_baseline_token(bert, batch):
    gate = TokenGate(bert, baseline_token_id=PAD)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    g = torch.ones(ids.shape)
    g[:, [1, 4]] = 0
    replaced = ids.clone()
    replaced[:, [1, 4]] = PAD
    with torch.no_grad():
        gated = gate(g, ids, mask)
    torch.testing.assert_close(gated, logits(bert, replaced, mask), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gated, logits(bert, ids, mask), atol=1e-3)


def test_the_gate_interpolates_embeddings(bert, batch):
    gate = TokenGate(bert, baseline_token_id=PAD)
    ids = batch["input_ids"]
    half = gate.embed(torch.full(ids.shape, 0.5), ids)
    ends = (gate.embed(torch.zeros(ids.shape), ids) + gate.embed(torch.ones(ids.shape), ids)) / 2
    torch.testing.assert_close(half, ends)


def test_every_captum_method_runs_unchanged_and_returns_token_scores(bert, batch):
    gate = TokenGate(bert, baseline_token_id=PAD)
    inputs = gated_inputs(batch["input_ids"], batch["attention_mask"])
    args = inputs.additional_forward_args
    methods = standard_methods(gate, ig_steps=8, extended=True)
    assert set(methods) == {
        "raw attention",
        "effective attention",
        "efficient attention",
        "minimal attention",
        "IntegratedGradients",
        "Saliency",
        "InputXGradient",
        "FeatureAblation",
    }
    # IG runs bounded internal batches, so sensitivity_max's expanded batches of long reviews fit
    # in memory
    assert methods["IntegratedGradients"][1] == {"n_steps": 8, "internal_batch_size": 64}
    kinds = (EfficientAttentionAttribution, IntegratedGradients, Saliency, InputXGradient)
    for name, spec in methods.items():
        method, kwargs = spec if isinstance(spec, tuple) else (spec, {})
        assert isinstance(method, (*kinds, FeatureAblation)), name
        scores = method.attribute(inputs.gate, target=1, additional_forward_args=args, **kwargs)
        assert scores.shape == inputs.gate.shape, name
        assert torch.isfinite(scores).all(), name
        # padding never gets a score (the gate of a masked token changes nothing)
        assert float(scores.detach()[1, -5:].abs().max()) == 0.0, name


def test_efficient_attention_in_gate_space_equals_the_token_id_path(bert, batch):
    """At g = 1 the model sees the real input, so attention is the same as from token ids."""
    gate = TokenGate(bert, baseline_token_id=PAD)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def forward_ids(ids, mask):
        return bert(input_ids=ids, attention_mask=mask).logits

    from_gate = EfficientAttentionAttribution(gate, model=bert).attribute(
        torch.ones(ids.shape), additional_forward_args=(ids, mask)
    )
    from_ids = EfficientAttentionAttribution(forward_ids, model=bert).attribute(
        ids, additional_forward_args=(mask,)
    )
    torch.testing.assert_close(from_gate, from_ids.to(from_gate.dtype), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_completeness_holds_in_gate_space(bert, batch):
    """IG's default zero baseline is the all-baseline-token text: its attributions sum to
    f(1) - f(0) (Captum's convergence delta), so the gate is a proper input space for it."""
    gate = TokenGate(bert, baseline_token_id=PAD)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _, delta = IntegratedGradients(gate).attribute(
        torch.ones(ids.shape),
        target=0,
        additional_forward_args=(ids, mask),
        n_steps=200,
        return_convergence_delta=True,
    )
    assert float(delta.abs().max()) < 1e-2


def test_encode_marks_words_removable_and_refuses_empty_texts(minilm_dir, minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    gate = TokenGate(model, minilm_tokenizer)
    assert gate.baseline_token_id == minilm_tokenizer.pad_token_id
    inputs = gate.encode(["a fine film", "dull"])
    assert inputs.gate.shape == inputs.input_ids.shape == (2, 5)
    assert inputs.removable.tolist() == [
        [False, True, True, True, False],
        [False, True, False, False, False],  # [CLS] dull [SEP] [PAD] [PAD]
    ]
    with pytest.raises(ValueError, match=r"text 1 is empty \('  '\)"):
        gate.encode(["fine", "  "])
    with pytest.raises(ValueError, match="no texts to encode"):
        gate.encode([])


def test_bad_gate_inputs_get_specific_errors(bert, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    gate = TokenGate(bert, baseline_token_id=PAD)
    with pytest.raises(
        ValueError, match=r"gate has shape \(2, 15\); expected \(B, S\) = \(2, 16\)"
    ):
        gate(torch.ones(2, 15), ids, mask)
    with pytest.raises(
        ValueError, match=r"the token gate must be a float tensor; got torch\.int64"
    ):
        gate(torch.ones(ids.shape, dtype=torch.long), ids, mask)
    with pytest.raises(ValueError, match=r"baseline token id in \[0, 99\).*got 99"):
        TokenGate(bert, baseline_token_id=99)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        gate.encode(["a text"])
    with pytest.raises(ValueError, match=r"examples \[1\] have no real token"):
        gated_inputs(ids, torch.stack([mask[0], torch.zeros_like(mask[1])]))
    with pytest.raises(ValueError, match=r"examples \[0\] are empty texts: only special tokens"):
        gated_inputs(ids[:1, :2], special_tokens_mask=torch.ones(1, 2))
