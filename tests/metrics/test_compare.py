"""compare_methods and the metric registry: the tidy table, metadata, and bad input."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency

from captum_effattn.metrics import (
    METRICS,
    Comprehensiveness,
    DeletionAUC,
    MetricInfo,
    Sufficiency,
    TokenGate,
    compare_methods,
    default_metrics,
    gated_inputs,
    get_metric,
)
from tests.models.tiny import tiny_inputs, tiny_model

PAD = 0


@pytest.fixture(scope="module")
def gate():
    return TokenGate(tiny_model("bert"), baseline_token_id=PAD)


@pytest.fixture(scope="module")
def inputs():
    batch = tiny_inputs("bert", batch=3, padding="right")
    return gated_inputs(batch["input_ids"], batch["attention_mask"])


def test_every_registered_metric_carries_its_metadata():
    metrics = default_metrics()
    assert [type(m) for m in metrics] == list(METRICS.values())
    for metric in metrics:
        info = metric.info
        assert isinstance(info, MetricInfo)
        assert info.name in METRICS
        low, high = info.range
        assert low < high
        assert info.description
        assert isinstance(get_metric(info.name), type(metric))
    directions = {m.info.name: m.info.lower_is_better for m in metrics}
    assert directions == {
        "infidelity": True,
        "sensitivity_max": True,
        "comprehensiveness": False,
        "sufficiency": True,
        "deletion_auc": True,
        "insertion_auc": False,
    }


def test_labels_name_the_parameters_that_make_numbers_comparable():
    assert Comprehensiveness().info.label == "comprehensiveness(bins=(0.01, 0.05, 0.1, 0.2, 0.5))"
    assert Comprehensiveness(bins=(0.1,)).info.label != Comprehensiveness().info.label
    assert Sufficiency(bins=(0.2, 0.4)).info.parameters == {"bins": (0.2, 0.4)}
    assert DeletionAUC(steps=4).info.label == "deletion_auc(steps=4)"


def test_the_table_has_a_row_per_example_method_and_metric(gate, inputs, tmp_path):
    metrics = [Comprehensiveness(), "deletion_auc", "sensitivity_max"]
    methods = {"Saliency": Saliency, "IG": (IntegratedGradients(gate), {"n_steps": 4})}
    result = compare_methods(gate, inputs, "predicted", methods, metrics, batch_size=2)
    assert len(result.records) == 3 * 2 * 3
    assert {(r["example"], r["method"]) for r in result.records} == {
        (e, m) for e in range(3) for m in ("Saliency", "IG")
    }
    assert all(math.isfinite(r["value"]) and r["seconds"] > 0 for r in result.records)
    summary = result.summary()
    assert len(summary) == 2 * 3
    for row in summary:
        values = [
            r["value"]
            for r in result.records
            if r["method"] == row["method"] and r["metric"] == row["metric"]
        ]
        assert row["n"] == 3
        assert row["mean"] == pytest.approx(sum(values) / 3)
        assert row["std"] == pytest.approx(torch.tensor(values).std().item(), rel=1e-6)
    text = result.format()
    assert "comprehensiveness ↑" in text
    assert "deletion_auc ↓" in text
    assert "IG" in text
    result.to_csv(tmp_path / "table.csv")
    with open(tmp_path / "table.csv") as file:
        assert len(list(csv.DictReader(file))) == len(result.records)


def test_batching_does_not_change_the_values(gate, inputs):
    metrics = [Comprehensiveness(), DeletionAUC()]

    def values(batch_size):
        result = compare_methods(
            gate, inputs, [0, 1, 2], {"Saliency": Saliency}, metrics, batch_size=batch_size,
            progress=False,
        )  # fmt: skip
        return torch.tensor(
            [r["value"] for r in result.records if r["metric"] == metrics[0].info.label]
        )

    torch.testing.assert_close(values(1), values(3), rtol=1e-5, atol=1e-6)


def test_bad_input_gets_specific_errors(gate, inputs, minilm_tokenizer):
    saliency = {"Saliency": Saliency}
    with pytest.raises(ValueError, match="returns 3 classes per example: pass targets"):
        compare_methods(gate, inputs, None, saliency, progress=False)
    with pytest.raises(ValueError, match="got 2 targets for 3 texts"):
        compare_methods(gate, inputs, [0, 1], saliency, progress=False)
    with pytest.raises(ValueError, match=r"targets \[0, 1, 7\] out of range for 3 classes"):
        compare_methods(gate, inputs, [0, 1, 7], saliency, progress=False)
    with pytest.raises(ValueError, match="unknown metric 'aopc'; registered: "):
        compare_methods(gate, inputs, "predicted", saliency, ["aopc"], progress=False)
    with pytest.raises(TypeError, match="method 'x' is int, not a Captum attribution"):
        compare_methods(gate, inputs, "predicted", {"x": 3}, progress=False)

    class Embeddings:
        def attribute(self, gate, target=None, additional_forward_args=None):
            return torch.ones(*gate.shape, 4)

    with pytest.raises(ValueError, match=r"'wide' returned attributions of shape \(3, 16, 4\)"):
        compare_methods(gate, inputs, "predicted", {"wide": Embeddings()}, progress=False)
    with pytest.raises(ValueError, match=r"text 0 is empty"):
        compare_methods(gate.model, [""], [0], saliency, tokenizer=minilm_tokenizer, progress=False)
