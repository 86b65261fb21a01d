"""``view="minimal"`` wherever views are accepted: attribute, attention_matrices,
check_sufficiency, compare_methods and the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import check_sufficiency
from captum_effattn.attr._views import get_view
from captum_effattn.demo.__main__ import build_parser
from captum_effattn.demo.explain import method_names
from captum_effattn.metrics import TokenGate, compare_methods, gated_inputs, standard_methods
from tests.attr.helpers import text_setup
from tests.models.tiny import NUM_HEADS, NUM_LAYERS, tiny_inputs, tiny_model

CLAIM_TOL = 1e-5  # relative logit change for float32 models


def test_the_minimal_view_is_registered():
    view = get_view("minimal")
    assert view.distribution
    assert view.solves
    assert view.method_name == "minimal attention"


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_attribute_with_the_minimal_view(name):
    padding = "left" if name == "gpt2" else "right"
    model, forward, ids, mask = text_setup(name, padding)
    explainer = EfficientAttentionAttribution(forward, model=model)
    scores, delta = explainer.attribute(
        ids, additional_forward_args=(mask,), view="minimal", return_convergence_delta=True
    )
    assert scores.shape == ids.shape
    assert (scores >= 0).all()
    assert (scores[mask == 0] == 0).all()
    torch.testing.assert_close(scores.sum(-1), torch.ones(len(ids)), atol=1e-5, rtol=0)
    assert delta.max() <= 1e-9
    efficient = explainer.attribute(ids, additional_forward_args=(mask,), view="efficient")
    assert not torch.allclose(scores, efficient)


def test_attention_matrices_in_the_minimal_view_are_vertices():
    model, forward, ids, mask = text_setup("bert", "right")
    explainer = EfficientAttentionAttribution(forward, model=model)
    matrices, delta = explainer.attention_matrices(
        ids, additional_forward_args=(mask,), view="minimal", return_convergence_delta=True
    )
    length = ids.shape[1]
    assert matrices.shape == (len(ids), NUM_LAYERS, NUM_HEADS, length, length)
    assert delta.max() <= 1e-9
    rows = matrices.permute(0, 3, 1, 2, 4)[mask.bool()]  # (real queries, L, H, S)
    assert (rows >= 0).all()
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]), atol=1e-5, rtol=0)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    # At most rank([1, V]) <= d + 1 keys per row, fewer than the 16 real keys of example 0.
    assert int((matrices[0] > 0).sum(-1).max()) <= head_dim + 1 < int(mask[0].sum())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_substituting_minimal_rows_reproduces_the_logits(name):
    padding = "left" if name == "llama" else "right"
    model, forward, ids, mask = text_setup(name, padding)
    report = check_sufficiency(model, ids, (mask,), forward_func=forward, view="minimal")
    assert report.holds(CLAIM_TOL), report.relative_change
    assert report.head_output_error.max() <= 1e-9


def test_compare_methods_and_the_demo_offer_the_minimal_view():
    gate = TokenGate(tiny_model("bert"), baseline_token_id=0)
    batch = tiny_inputs("bert", batch=2, padding="right")
    inputs = gated_inputs(batch["input_ids"], batch["attention_mask"])
    methods = standard_methods(gate, ig_steps=2)
    assert "minimal attention" in methods
    result = compare_methods(
        gate,
        inputs,
        "predicted",
        {"minimal attention": methods["minimal attention"]},
        metrics=["deletion_auc"],
        progress=False,
    )
    records = [r for r in result.records if r["method"] == "minimal attention"]
    assert len(records) == 2
    assert all(np.isfinite(r["value"]) for r in records)
    assert "minimal attention" in method_names()
    assert build_parser().parse_args(["--views", "minimal"]).views == ["minimal"]
