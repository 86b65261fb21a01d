"""The metric registry is keyed by each metric's own ``MetricInfo.name``."""

from __future__ import annotations

import pytest
import torch

from captum_effattn.metrics import METRICS, MetricInfo, get_metric, register_metric
from captum_effattn.metrics.base import metric_names


class _Constant:
    """A metric that says 0.5 for every example (a registry test double)."""

    def __init__(self, value: float = 0.5):
        self.value = value
        self.info = MetricInfo(
            name="constant_for_test",
            lower_is_better=True,
            range=(0.0, 1.0),
            description="the same number for every example",
            parameters={"value": value},
        )

    def __call__(self, context):
        return torch.full((context.target.shape[0],), self.value, dtype=torch.float64)


@pytest.fixture
def constant_metric():
    register_metric(_Constant)
    try:
        yield _Constant
    finally:
        del METRICS["constant_for_test"]


def test_every_metric_is_registered_under_its_own_info_name():
    assert metric_names() == (
        "infidelity",
        "sensitivity_max",
        "comprehensiveness",
        "sufficiency",
        "deletion_auc",
        "insertion_auc",
    )
    for name, cls in METRICS.items():
        assert cls().info.name == name


def test_registration_reads_the_name_from_the_info(constant_metric):
    assert METRICS["constant_for_test"] is _Constant
    metric = get_metric("constant_for_test")
    assert isinstance(metric, _Constant)
    assert metric.info.label == "constant_for_test(value=0.5)"
    assert register_metric(_Constant) is _Constant  # registering the same class again is a no-op


def test_a_second_class_cannot_take_a_registered_name(constant_metric):
    class Impostor(_Constant):
        pass

    with pytest.raises(ValueError, match="a metric named 'constant_for_test' is already"):
        register_metric(Impostor)
    assert METRICS["constant_for_test"] is _Constant


def test_the_name_is_no_longer_written_twice():
    with pytest.raises(TypeError, match="reads its name from its MetricInfo"):
        register_metric("infidelity")  # type: ignore[type-var]


def test_an_unknown_metric_lists_the_registered_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown metric 'aopc'; registered: \('infidelity', 'sensitivity_max', "
        r"'comprehensiveness', 'sufficiency', 'deletion_auc', 'insertion_auc'\)",
    ):
        get_metric("aopc")
