"""Method names come from the attribution registries (views, and weightings once they exist)."""

from __future__ import annotations

import pytest

from captum_effattn import attr
from captum_effattn.dataset import UnknownMethodError
from captum_effattn.dataset.methods import Method, available_methods, parse_methods


def test_views_and_weighted_views_are_the_methods():
    weighted = tuple(f"{v}+{w}" for v in attr.VIEWS for w in attr.WEIGHTINGS)
    assert available_methods() == tuple(attr.VIEWS) + weighted
    assert "efficient+gradient" in weighted
    assert parse_methods("efficient, raw") == (Method("efficient"), Method("raw"))
    assert parse_methods(["effective"])[0].column == "scores_effective"


def test_a_new_view_is_accepted_without_changes(monkeypatch):
    monkeypatch.setitem(attr.VIEWS, "sharp", attr.VIEWS["raw"])
    assert parse_methods("sharp")[0].attribute_kwargs() == {"view": "sharp"}


def test_weightings_compose_with_views(monkeypatch):
    monkeypatch.setattr(attr, "WEIGHTINGS", {"norm": object()}, raising=False)
    assert "efficient+norm" in available_methods()
    (method,) = parse_methods("efficient+norm")
    assert method.name == "efficient+norm"
    assert method.column == "scores_efficient_norm"
    assert method.attribute_kwargs() == {"view": "efficient", "weighting": "norm"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("efficient+nope", "unknown method 'efficient\\+nope'; choose from raw, effective"),
        ("", "no method given"),
        ("raw,raw", "listed twice: raw"),
    ],
)
def test_bad_method_lists(spec, message):
    with pytest.raises(UnknownMethodError, match=message):
        parse_methods(spec)
