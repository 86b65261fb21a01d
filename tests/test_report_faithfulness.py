"""The faithfulness report's script: its --quick run writes every section, every method, well-formed
intervals and its figures; its statistics are right on hand-made numbers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import report_faithfulness as report
from captum_effattn.metrics import gated_inputs

INTERVAL = re.compile(r"([+-]\d+\.\d+) \[([+-]\d+\.\d+), ([+-]\d+\.\d+)\]")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def quick_page(tmp_path_factory) -> Path:
    """The page of one --quick run (a few texts per dataset, tiny tweet and planted classifiers
    fine-tuned and cached on first use; minutes of CPU)."""
    out = tmp_path_factory.mktemp("report") / "faithfulness.md"
    threads = torch.get_num_threads()
    try:
        assert report.main(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_quick_page_has_every_section(quick_page):
    text = quick_page.read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings == list(report.SECTIONS)
    assert "Quick mode" in text
    assert "PYTHONPATH=. python benchmarks/report_faithfulness.py --quick" in text


def test_quick_page_tables_name_every_method(quick_page):
    text = quick_page.read_text()
    names = [mode.name for mode in report.attention_modes()] + list(report.BASELINES)
    for name in names:
        assert f"| {name} |" in text or f"| **{name}** |" in text, name
    for dataset in ("Rotten Tomatoes", "IMDB 64", "IMDB 128", "tweets", "planted"):
        assert f"### {dataset}" in text


def test_quick_page_intervals_are_well_formed(quick_page):
    intervals = INTERVAL.findall(quick_page.read_text())
    assert len(intervals) > 20
    for estimate, low, high in intervals:
        assert float(low) <= float(estimate) <= float(high)


def test_quick_page_figures_exist(quick_page):
    images = IMAGE.findall(quick_page.read_text())
    assert len(images) >= 3
    for image in images:
        path = quick_page.parent / image
        assert path.is_file(), image
        assert path.read_bytes()[:4] == b"\x89PNG", image


def test_verdict_and_goals_are_decided(quick_page):
    text = quick_page.read_text()
    verdict = text.split("## Verdict")[1].split("## Goals")[0]
    assert (
        len(re.findall(r"^- \*\*.+: (holds|does not hold|not measured)\.\*\*", verdict, re.M)) == 5
    )
    goals = text.split("## Goals")[1].split("## What next")[0]
    assert len(re.findall(r"\*\*(met|missed|not measured)\*\*", goals)) == 5


def test_paired_bootstrap_is_centred_and_seeded():
    a = np.array([0.3, 0.5, 0.1, 0.7])
    b = np.array([0.1, 0.2, 0.1, 0.2])
    estimate, low, high = report.paired_bootstrap(a, b, 500)
    assert estimate == pytest.approx(0.25)
    assert low <= estimate <= high
    assert low >= 0.0
    assert high <= 0.5
    assert report.paired_bootstrap(a, b, 500) == (estimate, low, high)
    assert report.paired_bootstrap(a, a - 0.1, 500) == pytest.approx((0.1, 0.1, 0.1))


def test_planted_ranks_count_ties_against_the_method():
    ids = torch.tensor([[101, 7, 8, 9, 102], [101, 7, 8, 9, 102]])
    special = torch.tensor([[1, 0, 0, 0, 1]] * 2)
    inputs = gated_inputs(ids, special_tokens_mask=special)
    scores = torch.tensor([[5.0, 0.1, 0.9, 0.2, 5.0], [0.0, 0.3, 0.3, 0.3, 0.0]])
    ranks = report.planted_ranks(inputs, scores, [8, 9])
    assert ranks.tolist() == [1.0, 3.0]  # [CLS]/[SEP] never compete; a 3-way tie ranks last
    assert np.isnan(report.planted_ranks(inputs, scores, [42, 42])).all()


def test_the_measured_modes_are_the_stated_subset():
    names = {mode.name for mode in report.attention_modes()}
    for view in report.VIEWS:
        assert f"{view} (mean)" in names
        assert f"{view}+gradient (mean)" in names
    assert {"raw+norm (mean)", "efficient+norm (mean)"} <= names
    assert "effective+norm (mean)" not in names
    rollouts = {name for name in names if name.endswith("(rollout)")}
    assert rollouts == {
        "raw (rollout)",
        "raw+gradient (rollout)",
        "efficient (rollout)",
        "efficient+gradient (rollout)",
    }


def test_solving_views_roll_out_only_on_short_inputs():
    efficient_rollout = report.Mode("efficient", None, "rollout")
    raw_rollout = report.Mode("raw", "gradient", "rollout")
    limit = report.ALL_ROWS_MAX_TOKENS
    assert report.measured_on(efficient_rollout, limit)
    assert not report.measured_on(efficient_rollout, limit + 1)
    assert report.measured_on(raw_rollout, 512)
    assert report.measured_on(report.Mode("minimal", "gradient", "mean"), 512)


def test_recorded_scores_are_replayed_in_order_without_running_again():
    class Counting:
        calls = 0

        def attribute(self, inputs, **kwargs):
            Counting.calls += 1
            return inputs * kwargs["factor"]

    recorded = report.Recorded(Counting())
    first = recorded.attribute(torch.ones(2, 3), factor=2.0)
    second = recorded.attribute(torch.ones(1, 2), factor=3.0)
    replay = recorded.replaying()
    assert torch.equal(replay.attribute(torch.zeros(2, 3), factor=9.0), first)
    assert torch.equal(replay.attribute(torch.zeros(1, 2), factor=9.0), second)
    assert Counting.calls == 2
    stacked = recorded.stacked(4)
    assert stacked.shape == (3, 4)
    assert stacked[2].tolist() == [3.0, 3.0, 0.0, 0.0]
