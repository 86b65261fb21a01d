"""What every metric shares: its metadata, the batch it scores, and a registry by name."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from captum_effattn.metrics.token_gate import GatedInputs


@dataclass(frozen=True)
class MetricInfo:
    """A metric's own description, carried with every number it produces.

    Attributes:
        name: short name (``"comprehensiveness"``).
        lower_is_better: the direction of a better explanation.
        range: ``(low, high)`` the values can take (``math.inf`` when unbounded).
        description: one sentence on what it measures.
        parameters: the settings that change its values (bins, radius, samples, ...): numbers
            computed with different parameters are not comparable.
    """

    name: str
    lower_is_better: bool
    range: tuple[float, float]
    description: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name`` with its parameters, e.g. ``comprehensiveness(bins=(0.01, ...))``."""
        settings = ", ".join(f"{key}={value}" for key, value in self.parameters.items())
        return f"{self.name}({settings})" if settings else self.name


@dataclass(frozen=True)
class MetricContext:
    """One batch, one method: everything a metric may need.

    Attributes:
        forward_func: ``forward_func(gate, *inputs.additional_forward_args) -> (B, C)`` logits.
        inputs: the batch in token-gate space.
        target: ``(B,)`` the class explained for each example.
        attributions: ``(B, S)`` the method's token scores for this batch.
        explain: the method as an ``explanation_func`` for ``sensitivity_max`` (see
            :func:`~captum_effattn.metrics.explanation_function`).
        seed: seeds the metric's perturbations (the same for every method on a batch).
        max_examples_per_batch: largest number of perturbed examples per forward pass.
    """

    forward_func: Callable[..., Tensor]
    inputs: GatedInputs
    target: Tensor
    attributions: Tensor
    explain: Callable[..., Any]
    seed: int = 0
    max_examples_per_batch: int = 64

    def __post_init__(self) -> None:
        expected = tuple(self.inputs.gate.shape)
        if tuple(self.attributions.shape) != expected:
            raise ValueError(
                f"attributions have shape {tuple(self.attributions.shape)}; the metrics need one "
                f"score per token, (B, S) = {expected} (sum embedding attributions over their "
                "last axis, or attribute in token-gate space)"
            )
        if tuple(self.target.shape) != expected[:1]:
            raise ValueError(
                f"target has shape {tuple(self.target.shape)}; expected (B,) = {expected[:1]}"
            )


class Metric(Protocol):
    """A metric: metadata, and ``(B,)`` float64 values for one batch and method."""

    info: MetricInfo

    def __call__(self, context: MetricContext) -> Tensor: ...


MetricFactory = Callable[[], Metric]
"""A metric class (or any callable) that builds the metric with its default parameters."""

METRICS: dict[str, MetricFactory] = {}
"""Metric classes keyed by their :attr:`MetricInfo.name`; :func:`register_metric` adds one."""

MetricClass = TypeVar("MetricClass", bound=type)


def register_metric(cls: MetricClass) -> MetricClass:
    """Class decorator: make a metric available to :func:`get_metric` under the name its
    :class:`MetricInfo` gives (read from an instance with the default parameters).

    Raises:
        TypeError: ``cls`` is not a class (the name is no longer passed: it comes from the info).
        ValueError: another metric class already has that name.
    """
    if not isinstance(cls, type):
        raise TypeError(
            f"register_metric decorates a metric class and reads its name from its MetricInfo; "
            f"got {cls!r}"
        )
    name = cls().info.name
    if METRICS.get(name, cls) is not cls:
        raise ValueError(f"a metric named {name!r} is already registered: {METRICS[name]!r}")
    METRICS[name] = cls
    return cls


def metric_names() -> tuple[str, ...]:
    """The registered metric names, in registration order."""
    return tuple(METRICS)


def get_metric(metric: str | Metric) -> Metric:
    """A metric instance: ``metric`` itself, or the registered one of that name with defaults.

    Raises:
        ValueError: no metric of that name (the message lists the registered ones).
    """
    if not isinstance(metric, str):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; registered: {metric_names()}")
    return METRICS[metric]()


def unbounded_above(low: float = 0.0) -> tuple[float, float]:
    """``(low, inf)``: the range of a non-negative error."""
    return (low, math.inf)


def as_float64(values: Tensor) -> Tensor:
    """``(B,)`` float64 on the CPU: how every metric reports."""
    return values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
