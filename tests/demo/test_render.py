"""The HTML page's legend says what each method's colours mean, truthfully (issue 18: it said
attention is never negative while the effective view showed a red token)."""

from __future__ import annotations

import re

import torch

from captum_effattn.demo.explain import Explanation, method_names
from captum_effattn.demo.render import html_report, legend

TOKENS = ["[CLS]", "a", "fine", "film", "[SEP]"]


def explanation(negative_effective: bool) -> Explanation:
    scores = {
        name: torch.tensor([0.4, 0.1, 0.3, 0.2, 0.0], dtype=torch.float64)
        for name in method_names()
    }
    scores["IntegratedGradients"] = torch.tensor([0.0, -0.2, 0.5, 0.1, 0.0], dtype=torch.float64)
    if negative_effective:
        scores["effective attention"] = torch.tensor(
            [0.6, -0.1, 0.3, 0.4, 0.1], dtype=torch.float64
        )
    return Explanation("a fine film", TOKENS, "positive", "positive", 0.9, scores=scores)


def legend_line(page: str, method: str) -> str:
    return re.search(rf"<li><b>{re.escape(method)}</b>: (.*?)</li>", page)[1]


def test_the_effective_view_is_said_to_take_negative_values():
    page = html_report([explanation(negative_effective=True)])
    assert "attention is never negative" not in page
    effective = legend_line(page, "effective attention")
    assert "not a distribution" in effective
    assert "can be negative" in effective
    assert "negative scores on this page" in effective
    # The negative token is drawn red, with its value in the tooltip.
    assert re.search(r'rgba\(200, 0, 0, 0\.\d+\)" title="-0\.\d+">a<', page)


def test_distributions_are_said_never_negative_and_are_not():
    page = html_report([explanation(negative_effective=False)])
    for method in ("raw attention", "efficient attention", "Saliency"):
        line = legend_line(page, method)
        assert "never negative" in line
        assert "no negative score here" in line
    assert "red against" in legend_line(page, "IntegratedGradients")
    assert "no negative score here" in legend_line(page, "effective attention")


def test_the_legend_never_claims_no_negatives_where_there_are():
    explanations = [explanation(True), explanation(False)]
    text = legend(explanations)
    for method in method_names():
        negative = any(bool((e.scores[method] < 0).any()) for e in explanations)
        assert ("negative scores on this page" in legend_line(text, method)) is negative


def tiny_explainer(**kwargs):
    from captum_effattn.data.training import SentimentClassifier
    from captum_effattn.demo.explain import Explainer
    from tests.attr.tiny_tokenizer import tiny_tokenizer
    from tests.models.tiny import tiny_model

    classifier = SentimentClassifier(tiny_model("bert"), tiny_tokenizer(bos=True), ("a", "b", "c"))
    return Explainer(classifier, **kwargs)


def test_the_explainer_checks_its_settings_and_reads_typed_special_tokens_as_text():
    import pytest

    with pytest.raises(ValueError, match=r"max_length must be at least 2 .* got 1"):
        tiny_explainer(max_length=1)
    with pytest.raises(ValueError, match=r"max_length 65 is longer than the 64 positions"):
        tiny_explainer(max_length=65)
    with pytest.raises(ValueError, match=r"ig_steps must be at least 1; got 0"):
        tiny_explainer(ig_steps=0)
    explanation = tiny_explainer(ig_steps=2).explain("<pad> the </s>", 0)
    assert explanation.tokens[0] == "<s>"
    assert "<pad>" not in explanation.tokens
    assert "</s>" not in explanation.tokens


def test_the_header_calls_rows_distributions_only_when_they_are():
    from captum_effattn.demo.explain import Explanation
    from captum_effattn.demo.render import effective_rows_are_distributions

    def explanation(sums, smallest):
        made = Explanation(
            text="a b", tokens=["[CLS]", "a", "[SEP]"], label="x", prediction="x", probability=0.5
        )
        made.effective_sums, made.effective_min = sums, smallest
        return made

    # Rows that print as 1.00..1.00 are still not distributions when an entry is negative ...
    assert not effective_rows_are_distributions(explanation((1.0, 1.0), -0.03))
    assert not effective_rows_are_distributions(explanation((0.98, 1.0), 0.0))
    # ... and are distributions when every entry is >= 0 and every sum is 1.
    assert effective_rows_are_distributions(explanation((1.0 - 1e-9, 1.0 + 1e-9), 0.0))


def test_special_tokens_stay_out_of_the_tables_and_the_colour_scale():
    """[CLS]/[SEP] hold most attention: they must not head the top-token table nor set (or hit)
    the colour scale; the text's own word pieces are scaled to their own largest score."""
    from captum_effattn.demo.render import _token_table, top_tokens

    tokens = ["[CLS]", "a", "fine", "film", "[SEP]"]
    scores = {
        name: torch.tensor([5.0, 0.1, 0.4, 0.2, 3.0], dtype=torch.float64)
        for name in method_names()
    }
    special = [True, False, False, False, True]
    example = Explanation("a fine film", tokens, "positive", "positive", 0.9, scores, special)
    for method in method_names():
        assert top_tokens(example, method) == ["fine", "film", "a"]
    table = "\n".join(_token_table(example))
    assert "[CLS]" not in table
    assert "[SEP]" not in table
    assert "+1.00" in table  # "fine" is the scale's peak, not [CLS]
    page = html_report([example])
    cls_cell = re.search(r'<span style="([^"]*)" title="([^"]*)">\[CLS\]</span>', page)
    assert "rgba" not in cls_cell[1]  # grey, not saturated green
    assert "special token" in cls_cell[2]
    fine = re.findall(
        r'<span style="background:rgba\(0, 128, 0, ([0-9.]+)\)"[^>]*>fine</span>', page
    )
    assert fine
    assert all(float(alpha) == 1.0 for alpha in fine)


def test_the_lead_method_comes_first_and_says_it_is_class_specific():
    from captum_effattn.demo.explain import LEAD_METHOD

    assert method_names()[0] == LEAD_METHOD
    page = html_report([explanation(negative_effective=False)])
    assert "class-specific" in legend_line(page, LEAD_METHOD)
