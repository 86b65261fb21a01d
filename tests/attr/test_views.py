"""The view registry is the single source of view names: a view registered for the length of a
test shows up in every list of views (attribute, compare_methods, the demo) and is gone after."""

from __future__ import annotations

import functools

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import VIEWS, View, register_view
from captum_effattn.attr._views import get_view
from captum_effattn.demo.__main__ import build_parser
from captum_effattn.demo.explain import GRADIENT_METHODS, LEAD_METHOD, method_names
from captum_effattn.metrics import TokenGate, compare_methods, gated_inputs, standard_methods
from tests.attr.helpers import text_setup
from tests.models.tiny import tiny_inputs, tiny_model


def _uniform(attn, values, key_mask, causal, spread=1.0, **options):
    """Uniform over the real keys (``spread`` scales it: an option to bind)."""
    weights = key_mask.unsqueeze(-2).to(attn.dtype).expand_as(attn)
    rows = spread * weights / weights.sum(-1, keepdim=True).clamp_min(1)
    return rows, torch.zeros(attn.shape[:-1], dtype=torch.float64, device=attn.device)


UNIFORM = View(
    "uniform",
    _uniform,
    distribution=True,
    solves=False,
    description="uniform over the real tokens (a test view)",
    options=("spread",),
)


@pytest.fixture
def uniform_view():
    register_view(UNIFORM)
    try:
        yield UNIFORM
    finally:
        del VIEWS[UNIFORM.name]


def test_the_built_in_views_and_their_properties():
    assert tuple(VIEWS) == ("raw", "effective", "efficient", "minimal")
    assert [v.distribution for v in VIEWS.values()] == [True, False, True, True]
    assert [v.solves for v in VIEWS.values()] == [False, True, True, True]
    assert all(name == v.name and v.description for name, v in VIEWS.items())
    assert VIEWS["efficient"].method_name == "efficient attention"


def test_a_registered_view_is_usable_everywhere(uniform_view):
    model, forward, ids, mask = text_setup("bert")
    scores = EfficientAttentionAttribution(forward, model=model).attribute(
        ids, additional_forward_args=(mask,), view="uniform"
    )
    expected = mask / mask.sum(-1, keepdim=True)
    torch.testing.assert_close(scores, expected.to(scores.dtype))
    assert method_names() == (
        LEAD_METHOD,
        "raw attention",
        "effective attention",
        "efficient attention",
        "minimal attention",
        "uniform attention",
        *GRADIENT_METHODS,
    )
    assert build_parser().parse_args(["--views", "uniform", "raw"]).views == ["uniform", "raw"]
    with pytest.raises(
        ValueError, match=r"\('raw', 'effective', 'efficient', 'minimal', 'uniform'\)"
    ):
        get_view("minimum")


def test_compare_methods_scores_every_registered_view(uniform_view):
    gate = TokenGate(tiny_model("bert"), baseline_token_id=0)
    batch = tiny_inputs("bert", batch=2, padding="right")
    inputs = gated_inputs(batch["input_ids"], batch["attention_mask"])
    methods = standard_methods(gate, ig_steps=2)
    attention = {name: spec for name, spec in methods.items() if name.endswith(" attention")}
    assert list(attention) == [v.method_name for v in VIEWS.values()]
    result = compare_methods(
        gate, inputs, "predicted", attention, metrics=["deletion_auc"], progress=False
    )
    assert "uniform attention" in result.methods
    assert len([r for r in result.records if r["method"] == "uniform attention"]) == 2


def test_registry_entries_disappear_and_names_are_unique(uniform_view):
    with pytest.raises(ValueError, match="a view named 'uniform' is already registered"):
        register_view(UNIFORM)


def test_the_demo_and_comparisons_forget_a_removed_view():
    assert "uniform" not in VIEWS
    assert "uniform attention" not in method_names()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--views", "uniform"])


def test_view_options_are_bound_and_checked():
    bound = UNIFORM.with_options(spread=2.0)
    assert isinstance(bound.project, functools.partial)
    attn = torch.full((1, 1, 4), 0.25)
    rows, _ = bound.project(attn, torch.zeros(1, 4, 2), torch.ones(1, 4, dtype=torch.bool), False)
    torch.testing.assert_close(rows, torch.full((1, 1, 4), 0.5))
    assert UNIFORM.with_options(spread=None) is UNIFORM  # an unset option changes nothing
    with pytest.raises(ValueError, match=r"view 'raw' takes no option 'weighting'; its options"):
        get_view("raw").with_options(weighting="uniform")
