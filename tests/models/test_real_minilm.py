"""capture_attention on the real offline MiniLM (BERT, 6 layers, 12 heads of width 32), loaded
with the transformers default (sdpa), on a padded batch of two real reviews."""

from __future__ import annotations

import pytest
import torch

from tests.models.references import (
    EfficientSubstitution,
    eager_attentions,
    hooked_values,
    mixed_with_uniform,
    relative_change,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="module")
def batch(minilm_tokenizer):
    """A 64-token IMDB review and a shorter Rotten Tomatoes one, padded to 64 tokens.

    Both are longer than d_head + 1 = 33 tokens, so their attention rows are not identifiable.
    """
    from captum_effattn.data import load_reviews

    def length(text):
        return len(minilm_tokenizer(text)["input_ids"])

    long = next(r.text for r in load_reviews("imdb") if length(r.text) >= 64)
    short = next(r.text for r in load_reviews("rotten_tomatoes") if 40 <= length(r.text) <= 56)
    enc = minilm_tokenizer(
        [long, short], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    assert enc["input_ids"].shape == (2, 64)
    assert not enc["attention_mask"][1].all()
    return dict(enc)


def hidden(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


@pytest.fixture(scope="module")
def record(minilm, batch):
    from captum_effattn.models import capture_attention

    with torch.no_grad(), capture_attention(minilm) as record:
        minilm(**batch)
    return record


def test_probabilities_values_and_key_mask(minilm, batch, record):
    attentions = eager_attentions(minilm, batch)
    values = hooked_values(minilm, batch)
    assert len(record.layers) == 6
    for captured in record.layers:
        assert captured.attn.shape == (2, 12, 64, 64)
        assert captured.values.shape == (2, 12, 64, 32)
        assert not captured.causal
        assert torch.equal(captured.key_mask, batch["attention_mask"].bool())
        # sdpa and eager round differently and the difference compounds over layers: 1.3e-6
        # was seen in layer 5, so 1e-6 was flaky; 1e-5 still catches any wrong row or mask.
        torch.testing.assert_close(captured.attn, attentions[captured.layer], rtol=0, atol=1e-5)
        torch.testing.assert_close(captured.values, values[captured.layer], rtol=1e-5, atol=1e-5)


def test_capture_and_identity_leave_the_output_unchanged(minilm, batch):
    from captum_effattn.models import capture_attention

    plain = hidden(minilm, batch)
    with capture_attention(minilm):
        captured = hidden(minilm, batch)
    with capture_attention(minilm, transform=lambda c: c.attn):
        identity = hidden(minilm, batch)
    assert relative_change(captured, plain) <= 2e-6
    assert relative_change(identity, plain) <= 2e-6


def test_efficient_attention_leaves_the_output_unchanged(minilm, batch):
    from captum_effattn.models import capture_attention

    plain = hidden(minilm, batch)
    efficient = EfficientSubstitution()
    with capture_attention(minilm, transform=efficient):
        substituted = hidden(minilm, batch)
    assert relative_change(substituted, plain) <= 1e-5
    # Not vacuous: 64 keys > d_head + 1 = 33, so rows do move.
    assert efficient.moved > 0.05


def test_perturbed_attention_changes_the_output(minilm, batch):
    from captum_effattn.models import capture_attention

    def perturbed(captured):
        return mixed_with_uniform(captured.attn, captured.key_mask, captured.causal)

    plain = hidden(minilm, batch)
    with capture_attention(minilm, transform=perturbed):
        changed = hidden(minilm, batch)
    assert relative_change(changed, plain) > 1e-2
