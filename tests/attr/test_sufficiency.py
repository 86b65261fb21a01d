"""The central claim, end to end: substituted efficient attention reproduces the logits."""

from __future__ import annotations

import pytest
import torch

from captum_effattn.attr import check_sufficiency
from tests.attr.helpers import text_setup
from tests.models.references import mixed_with_uniform as mix_with_uniform

CLAIM_TOL = 1e-5  # relative logit change for float32 models


def mixed_with_uniform(attn, values, key_mask, causal):
    """A negative control: still distributions over the visible keys, but other head outputs."""
    return mix_with_uniform(attn, key_mask, causal)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "distilbert"])
@pytest.mark.parametrize("view", ["efficient", "effective"])
def test_substituting_every_head_reproduces_the_logits(name, view):
    padding = "left" if name in ("gpt2", "llama") else "right"
    model, forward, ids, mask = text_setup(name, padding)
    report = check_sufficiency(model, ids, (mask,), forward_func=forward, view=view)
    assert report.holds(CLAIM_TOL), report.relative_change
    assert report.head_output_error.max() <= 1e-9
    assert report.relative_change.shape == (len(ids),)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_a_perturbed_distribution_changes_the_logits(name):
    model, forward, ids, mask = text_setup(name, None)
    report = check_sufficiency(model, ids, (mask,), forward_func=forward, view=mixed_with_uniform)
    assert not report.holds(CLAIM_TOL)
    assert report.relative_change.min() > 1e-2


def test_substituting_some_heads_only():
    model, forward, ids, mask = text_setup("llama", None)
    report = check_sufficiency(model, ids, (mask,), forward_func=forward, layers=[0, 2], heads=[1])
    assert report.holds(CLAIM_TOL)
    perturbed = check_sufficiency(
        model, ids, (mask,), forward_func=forward, layers=[0], heads=[1], view=mixed_with_uniform
    )
    assert perturbed.max_relative_change > 1e-3


@pytest.mark.slow
def test_real_minilm_logits_survive_efficient_attention(
    minilm_dir, minilm_tokenizer, long_imdb_review
):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the classifier head is new: fix it
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    texts = [long_imdb_review, "A gripping, beautifully acted film."]
    enc = minilm_tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=128
    )

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    args = (enc["attention_mask"],)
    report = check_sufficiency(model, enc["input_ids"], args, forward_func=forward)
    assert report.holds(CLAIM_TOL), report.relative_change
    assert report.head_output_error.max() <= 1e-9
    perturbed = check_sufficiency(
        model, enc["input_ids"], args, forward_func=forward, view=mixed_with_uniform
    )
    assert perturbed.relative_change.min() > 1e-3


class _EagerOnly:
    """An attention registry that ignores ``config._attn_implementation``: every layer computes
    its own eager attention, as architectures that do not dispatch through transformers'
    ``AttentionInterface`` do (DeBERTa-v2)."""

    def get_interface(self, name, default):
        return default


def _bypassing_the_capture(monkeypatch):
    from transformers.models.bert import modeling_bert

    monkeypatch.setattr(modeling_bert, "ALL_ATTENTION_FUNCTIONS", _EagerOnly())
    return text_setup("bert", None, "eager")


def test_attention_that_bypasses_the_capture_is_an_error_not_a_pass(monkeypatch):
    model, forward, ids, mask = _bypassing_the_capture(monkeypatch)
    with pytest.raises(RuntimeError, match=r"selected layers \(0, 1, 2\).*AttentionInterface"):
        check_sufficiency(model, ids, (mask,), forward_func=forward)
    with pytest.raises(RuntimeError, match=r"selected layers \(1,\)"):
        check_sufficiency(model, ids, (mask,), forward_func=forward, layers=1)


def test_attribute_on_attention_that_bypasses_the_capture_names_the_layers(monkeypatch):
    from captum_effattn import EfficientAttentionAttribution

    model, forward, ids, mask = _bypassing_the_capture(monkeypatch)
    explainer = EfficientAttentionAttribution(forward, model=model)
    for view in ("efficient", "raw"):
        with pytest.raises(RuntimeError, match=r"selected layers \(0, 1, 2\).*AttentionInterface"):
            explainer.attribute(ids, additional_forward_args=(mask,), view=view)
