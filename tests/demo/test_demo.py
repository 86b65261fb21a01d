"""The README's main job, end to end on the cached fine-tuned classifier."""

from __future__ import annotations

import re

import pytest

from captum_effattn.demo.__main__ import main
from captum_effattn.demo.explain import method_names

pytestmark = pytest.mark.slow


def test_demo_explains_a_sentence_and_a_long_review(sentiment_classifier, tmp_path, capsys):
    main(["--sentences", "1", "--reviews", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # The sufficiency check ran on both examples and held.
    changes = [float(x) for x in re.findall(r"logits move by ([0-9.e+-]+)", out)]
    assert len(changes) == 2
    assert max(changes) <= 1e-5
    errors = [float(x) for x in re.findall(r"head outputs reproduced to ([0-9.e+-]+)", out)]
    assert max(errors) <= 1e-9
    # The sentence is short (identifiable); the 256-token review is not.
    assert "the attention views coincide" in out
    assert re.search(
        r"effective \[CLS\] rows sum to -?[0-9.]+\.\.[0-9.]+( with entries down to -[0-9.e-]+)?: "
        r"not distributions",
        out,
    )
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    for method in method_names():
        assert page.count(f"<th>{method}</th>") == 2
    summary = next(line for line in out.splitlines() if line.startswith("mean seconds per example"))
    for method in method_names():
        assert re.search(rf"{re.escape(method)} [0-9]+\.[0-9]+", summary)
