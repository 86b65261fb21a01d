"""The tutorials run as written and show what their text says they show."""

from __future__ import annotations

import math
import re
import runpy
import warnings
from pathlib import Path

import pytest

from captum_effattn.attr import VIEWS

TUTORIALS = Path(__file__).parents[2] / "tutorials"
pytestmark = pytest.mark.slow


def run(name: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("TUTORIAL_QUICK", "1")
    runpy.run_path(str(TUTORIALS / name), run_name="__main__")
    return capsys.readouterr().out


def test_every_tutorial_is_tested():
    tested = {
        "01_why_efficient_attention.py",
        "02_captum_pipeline.py",
        "03_comparing_methods.py",
        "04_bert_tutorial_swap.py",
        "05_llm_continuation.py",
    }
    assert {p.name for p in TUTORIALS.glob("*.py")} <= tested


def test_why_efficient_attention(sentiment_classifier, capsys, monkeypatch):
    out = run("01_why_efficient_attention.py", capsys, monkeypatch)
    # It leads with the recommended mode: class-specific, non-negative, word pieces first.
    top = re.search(r"top word pieces: (.+)", out)[1]
    assert "[CLS]" not in top
    assert "[SEP]" not in top
    assert len(top.split(", ")) == 3
    assert float(re.search(r"smallest score (\S+) \(never negative\)", out)[1]) >= 0
    effective = re.search(r"effective: head-output change (\S+); sums (\S+)\.\.(\S+);", out)
    efficient = re.search(r"efficient: head-output change (\S+); sums (\S+)\.\.(\S+);", out)
    assert float(effective[1]) <= 1e-9
    assert float(effective[2]) < 0.99  # not a distribution
    assert float(efficient[1]) <= 1e-9
    assert float(efficient[2]) == pytest.approx(1)
    assert float(efficient[3]) == pytest.approx(1)
    canonical = re.search(r"efficient\(mixture\) vs efficient\(raw\): (\S+)", out)
    assert float(canonical[1]) <= 1e-9
    assert "efficient == raw: True" in out


def test_captum_pipeline(sentiment_classifier, capsys, monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # past pyproject's filter of this very warning
        out = run("02_captum_pipeline.py", capsys, monkeypatch)
    assert not [w for w in caught if "did not already require gradients" in str(w.message)]
    shapes = re.findall(
        r"^(IntegratedGradients|Saliency|EfficientAttention)\s+(\(.*?\))", out, re.M
    )
    assert len(shapes) == 3
    assert len({shape for _, shape in shapes}) == 1  # one input shape for all three methods
    assert "holds: True" in out
    assert float(re.search(r"perturbed attention: relative logit change (\S+)", out)[1]) > 1e-3
    assert "rollout sums to 1.0000" in out


def test_comparing_methods(sentiment_classifier, capsys, monkeypatch):
    out = run("03_comparing_methods.py", capsys, monkeypatch)
    gate = re.search(r"^gate: (\(.*?\))", out, re.M)[1]
    assert re.search(rf"^IntegratedGradients: {re.escape(gate)}$", out, re.M)
    assert re.search(rf"^EfficientAttention: {re.escape(gate)}$", out, re.M)
    plain = re.findall(r"infidelity \[(.*?)\] sensitivity_max \[(.*?)\]", out)
    assert len(plain) == 2
    for infidelities, sensitivities in plain:
        values = [float(v) for v in f"{infidelities}, {sensitivities}".split(", ")]
        assert len(values) == 4
        assert all(math.isfinite(v) and v >= 0 for v in values)
    header = re.search(r"^method\s+(.*)$", out, re.M)[1].split()
    assert [h for h in header if h not in "↑↓"] == [
        "infidelity",
        "sensitivity_max",
        "comprehensiveness",
        "sufficiency",
        "deletion_auc",
        "insertion_auc",
        "s/example",
    ]
    methods = [view.method_name for view in VIEWS.values()]
    for method in [*methods, "IntegratedGradients", "Saliency"]:
        assert re.search(rf"^{method}\s+-?\d", out, re.M), method


def test_bert_tutorial_swap(sentiment_classifier, capsys, monkeypatch):
    out = run("04_bert_tutorial_swap.py", capsys, monkeypatch)
    shapes = re.findall(r"^(\w+): attributions (\(.*?\)) delta (\S+)$", out, re.M)
    assert [name for name, _, _ in shapes] == [
        "LayerIntegratedGradients",
        "LayerEfficientAttentionAttribution",
    ]
    assert shapes[0][1] == shapes[1][1]  # one shape, that of the embeddings' output
    assert float(shapes[1][2]) <= 1e-6
    total = re.search(r"^LayerEfficientAttentionAttribution top tokens: .*; sum (\S+)$", out, re.M)
    assert float(total[1]) == pytest.approx(1, abs=1e-4)  # the [CLS] row, a distribution
    scaled = re.search(
        r"^LayerEfficientAttentionAttribution visualization_record: \[CLS\] colour (\S+), "
        r"strongest word colour (\S+)$",
        out,
        re.M,
    )
    assert float(scaled[1]) == 0
    assert float(scaled[2]) == 1


def test_llm_continuation(capsys, monkeypatch):
    out = run("05_llm_continuation.py", capsys, monkeypatch)
    assert "random weights" in (TUTORIALS / "05_llm_continuation.py").read_text()
    ours = re.search(
        r"^LLMEfficientAttention token_attr (\(.*?\)); forward passes: (\d+)$", out, re.M
    )
    assert int(ours[2]) == 1
    assert "rows sum to at most 1: True (first row 1.0000)" in out
    for name in ("FeatureAblation", "LayerIntegratedGradients"):
        assert re.search(rf"^{name} token_attr {re.escape(ours[1])}; same tokens: True$", out, re.M)
    assert "plots saved: ['seq_attr.png', 'token_attr.png']" in out
