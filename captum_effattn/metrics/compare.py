"""Score several attribution methods with several metrics on the same texts: a tidy table."""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients, Saliency
from torch import Tensor, nn
from tqdm.auto import tqdm

from captum_effattn.attr import VIEWS, EfficientAttentionAttribution
from captum_effattn.metrics._checks import check_positive_int, check_texts, class_indices
from captum_effattn.metrics.base import Metric, MetricContext, MetricInfo, get_metric
from captum_effattn.metrics.eraser import check_target_range
from captum_effattn.metrics.perturbations import explanation_function
from captum_effattn.metrics.scores import default_metrics
from captum_effattn.metrics.token_gate import GatedInputs, TokenGate

IG_INTERNAL_BATCH = 64
"""Inputs per IntegratedGradients forward pass in :func:`standard_methods` (at least n_steps;
Captum warns and raises it to the number of examples when that is larger)."""

MethodSpec = Any
"""An ``Attribution`` built on the token gate, an ``(attribution, attribute_kwargs)`` pair, or a
factory ``gate -> attribution or pair`` (Captum's classes are factories: ``Saliency``)."""


@dataclass(frozen=True)
class Method:
    """A named attribution method with the keyword arguments of its ``attribute`` calls."""

    name: str
    attribution: Any
    attribute_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def attribute(self, inputs: GatedInputs, target: Tensor) -> Tensor:
        """``(B, S)`` token scores."""
        result = self.attribution.attribute(
            inputs.gate,
            target=target,
            additional_forward_args=inputs.additional_forward_args,
            **self.attribute_kwargs,
        )
        return result.detach()

    def explanation_function(self) -> Callable[..., Any]:
        return explanation_function(self.attribution, **self.attribute_kwargs)


def standard_methods(
    gate: TokenGate, ig_steps: int = 50, extended: bool = False
) -> dict[str, MethodSpec]:
    """The methods this package compares, built on ``gate``.

    Every registered attention view (:data:`~captum_effattn.attr.VIEWS`, named ``"<view>
    attention"``; ``EfficientAttentionAttribution``, default query and all heads),
    IntegratedGradients (``n_steps=ig_steps``, the zero gate as baseline: every token
    replaced by the baseline token; at most ``max(ig_steps, 64)`` inputs per internal batch)
    and Saliency (Captum's default absolute gradients); with
    ``extended=True`` also InputXGradient and FeatureAblation (one forward pass per token).

    Raises:
        TypeError: ``gate`` is not a :class:`TokenGate` (wrap the model:
            ``TokenGate(model, tokenizer)``), or ``ig_steps`` is not an int.
        ValueError: ``ig_steps`` below 1.
    """
    if not isinstance(gate, TokenGate):
        raise TypeError(
            f"standard_methods needs a TokenGate, the classifier in token-gate space; got "
            f"{type(gate).__name__}: pass TokenGate(model, tokenizer)"
        )
    ig_steps = check_positive_int(ig_steps, "ig_steps")
    attention = EfficientAttentionAttribution(gate, model=gate.model)
    methods: dict[str, MethodSpec] = {
        view.method_name: (attention, {"view": view.name}) for view in VIEWS.values()
    }
    # Bounded internal batches: without them, sensitivity_max hands IG its batch times the
    # perturbation samples at once, n_steps copies of each (24 GB at 4 x 5 x 50 x 256 tokens).
    ig_kwargs = {"n_steps": ig_steps, "internal_batch_size": max(ig_steps, IG_INTERNAL_BATCH)}
    methods["IntegratedGradients"] = (IntegratedGradients(gate), ig_kwargs)
    methods["Saliency"] = Saliency(gate)
    if extended:
        methods["InputXGradient"] = InputXGradient(gate)
        methods["FeatureAblation"] = FeatureAblation(gate)
    return methods


def _resolve_method(name: str, spec: MethodSpec, gate: TokenGate) -> Method:
    is_factory = isinstance(spec, type) or (callable(spec) and not hasattr(spec, "attribute"))
    if is_factory and not isinstance(spec, tuple):
        spec = spec(gate)
    attribution, kwargs = spec if isinstance(spec, tuple) else (spec, {})
    if not hasattr(attribution, "attribute"):
        raise TypeError(
            f"method {name!r} is {type(attribution).__name__}, not a Captum attribution (an "
            "object with .attribute), an (attribution, kwargs) pair, or a factory of one"
        )
    return Method(name, attribution, dict(kwargs))


def resolve_targets(gate: Callable[..., Tensor], inputs: GatedInputs, targets: Any) -> Tensor:
    """``(B,)`` the class to explain for each example.

    Args:
        targets: a sequence or tensor of ``B`` class indices (whole numbers: ``0.9`` is not
            class 0), one int for every example, ``"predicted"`` (the model's own answer), or
            ``None`` for a single-logit model.

    Raises:
        ValueError: ``targets`` is missing for a multi-class model, has the wrong length, is not
            a whole number, or names a class the model does not have.
        TypeError: ``targets`` is none of the above.
    """
    with torch.no_grad():
        logits = gate(inputs.gate, *inputs.additional_forward_args)
    batch = inputs.gate.shape[0]
    classes = 1 if logits.dim() == 1 else logits.shape[-1]
    if isinstance(targets, str):
        if targets != "predicted":
            raise ValueError(f"targets must be class indices or 'predicted'; got {targets!r}")
        return logits.argmax(-1) if classes > 1 else logits.new_zeros(batch, dtype=torch.long)
    if targets is None:
        if classes > 1:
            raise ValueError(
                f"the model returns {classes} classes per example: pass targets (one class index "
                "per text) or targets='predicted'"
            )
        return logits.new_zeros(batch, dtype=torch.long)
    target = class_indices(targets, batch)
    check_target_range(target, classes, "targets")
    return target.to(logits.device)


RECORD_FIELDS = ("example", "method", "metric", "value", "lower_is_better", "seconds", "target")
"""The keys of every :attr:`Comparison.records` entry, in CSV column order."""


@dataclass
class Comparison:
    """What :func:`compare_methods` measured.

    Attributes:
        records: one dict per (example, method, metric), keyed by :data:`RECORD_FIELDS`:
            ``example`` (index into the texts), ``method``, ``metric`` (the metric's label, with
            its parameters), ``value``, ``lower_is_better``, ``seconds`` (the method's
            attribution time per example in its batch), ``target``.
        metrics: the metrics' metadata, in order.
        methods: the method names, in order.
    """

    records: list[dict[str, Any]]
    metrics: tuple[MetricInfo, ...]
    methods: tuple[str, ...]

    def summary(self) -> list[dict[str, Any]]:
        """One dict per (method, metric): ``mean``, ``std`` (sample; 0 for one example), ``n``,
        ``lower_is_better``, and ``seconds`` (mean attribution time per example). A pair with no
        records has ``n = 0`` and NaN for the rest."""
        return [self._summarize(method, info) for method in self.methods for info in self.metrics]

    def _summarize(self, method: str, info: MetricInfo) -> dict[str, Any]:
        mine = [r for r in self.records if r["method"] == method]
        values = [r["value"] for r in mine if r["metric"] == info.label]
        seconds = [r["seconds"] for r in mine]
        return {
            "method": method,
            "metric": info.label,
            "mean": statistics.fmean(values) if values else math.nan,
            "std": (statistics.stdev(values) if len(values) > 1 else 0.0) if values else math.nan,
            "n": len(values),
            "lower_is_better": info.lower_is_better,
            "seconds": statistics.fmean(seconds) if seconds else math.nan,
        }

    def format(self) -> str:
        """The summary as a plain-text table: a row per method, mean ± std per metric (``-``
        where nothing was scored)."""
        summary = {(row["method"], row["metric"]): row for row in self.summary()}
        headers = [
            "method",
            *(f"{i.name} {'↓' if i.lower_is_better else '↑'}" for i in self.metrics),
            "s/example",
        ]
        lines = []
        for method in self.methods:
            rows = [summary[(method, info.label)] for info in self.metrics]
            cells = [method, *(_mean_and_std(row) for row in rows)]
            seconds = rows[0]["seconds"] if rows else math.nan
            cells.append("-" if math.isnan(seconds) else f"{seconds:.3f}")
            lines.append(cells)
        render = _aligned([headers, *lines])
        notes = [f"{i.label}: {i.description}" for i in self.metrics]
        if not self.records:
            notes.insert(0, "(no records: nothing was scored)")
        return "\n".join([*render, "", *notes])

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :attr:`records` as CSV, columns :data:`RECORD_FIELDS` (only the header when
        there are no records)."""
        fields = list(RECORD_FIELDS)
        fields += [key for record in self.records for key in record if key not in fields]
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(dict.fromkeys(fields)))
            writer.writeheader()
            writer.writerows(self.records)


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as lines, each column padded to its widest cell."""
    widths = [max(len(str(c)) for c in column) for column in zip(*rows, strict=True)]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in rows
    ]


def _mean_and_std(row: Mapping[str, Any]) -> str:
    return "-" if row["n"] == 0 else f"{row['mean']:.4f} ± {row['std']:.4f}"


def _batches(
    texts: list[str] | GatedInputs, gate: TokenGate, batch_size: int, max_length: int | None
) -> list[tuple[int, GatedInputs]]:
    count = len(texts)
    starts = range(0, count, batch_size)
    if isinstance(texts, GatedInputs):
        return [(start, texts.slice(start, start + batch_size)) for start in starts]
    return [
        (start, gate.encode(texts[start : start + batch_size], max_length=max_length))
        for start in starts
    ]


def compare_methods(
    model: TokenGate | nn.Module,
    texts: Sequence[str] | GatedInputs,
    targets: Sequence[int] | Tensor | int | str | None,
    methods: Mapping[str, MethodSpec],
    metrics: Sequence[Metric | str] | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
    max_examples_per_batch: int = 64,
    progress: bool = True,
) -> Comparison:
    r"""Score every method with every metric on the same texts.

    Args:
        model (TokenGate or nn.Module): the classifier in token-gate space, or a Hugging Face
            classifier (wrapped as ``TokenGate(model, tokenizer)``).
        texts (list[str] or GatedInputs): the texts (tokenized here, ``max_length`` word pieces;
            a single ``str`` is refused: pass ``[text]``), or token ids already in
            :class:`GatedInputs` (see :func:`~captum_effattn.metrics.gated_inputs`).
        targets: one class index per text (whole numbers; a float such as ``0.9`` is refused,
            not truncated), one int for every text, ``"predicted"``, or ``None`` (single-logit
            models).
        methods (dict[str, ...]): name -> a Captum attribution built on the token gate, an
            ``(attribution, attribute_kwargs)`` pair, or a factory ``gate -> either`` (for
            example ``Saliency`` itself); :func:`standard_methods` builds the usual five.
        metrics (list, optional): metric instances or registered names. Default: one of each
            (:func:`~captum_effattn.metrics.default_metrics`).
        tokenizer: needed when ``model`` is a module and ``texts`` are strings.
        batch_size (int): texts per ``attribute`` call.
        max_length (int, optional): word pieces kept per text, special tokens included (see
            :meth:`TokenGate.encode`; ignored for :class:`GatedInputs`). Default: 256, or the
            model's positions if fewer.
        seed (int): seeds every perturbation; each batch's perturbations are the same for
            every method, and the whole table is the same on a rerun.
        max_examples_per_batch (int): perturbed examples per forward pass inside the metrics.
        progress (bool): show a progress bar.

    Returns:
        :class:`Comparison`: ``records`` (one per example, method, metric, with the attribution
        time per example), ``summary()``, ``format()``, ``to_csv()``.

    Raises:
        ValueError: no texts, no methods or no metrics; an empty text; targets missing for a
            multi-class model, not whole numbers, not one per text or out of the model's
            classes; ``max_length`` out of range; a method whose attributions are not
            ``(B, S)``. All are raised before any method runs, except the last.
        TypeError: ``texts`` is a single string or holds a non-string, ``methods`` is not a
            mapping, a method is not an attribution, ``model`` is not a classifier.
    """
    gate = model if isinstance(model, TokenGate) else TokenGate(model, tokenizer)
    batch_size = check_positive_int(batch_size, "batch_size")
    max_examples_per_batch = check_positive_int(max_examples_per_batch, "max_examples_per_batch")
    resolved = _resolve_methods(methods, gate)
    scorers = [get_metric(m) for m in (default_metrics() if metrics is None else metrics)]
    if not scorers:
        raise ValueError("metrics is empty: pass metric names or instances, or None for all")
    if not isinstance(texts, GatedInputs):
        texts = check_texts(texts)
    elif len(texts) == 0:
        raise ValueError("texts is empty: there is nothing to explain")
    batches = _batches(texts, gate, batch_size, max_length)
    per_text = _per_text_targets(targets, len(texts))
    wanted = (targets if per_text is None else per_text[s : s + len(b)] for s, b in batches)
    batch_targets = [resolve_targets(gate, b, w) for (_, b), w in zip(batches, wanted, strict=True)]

    torch.manual_seed(seed)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(batches) * len(resolved), disable=not progress, desc="compare")
    with warnings.catch_warnings():
        # Saliency-like methods set requires_grad on the gate themselves and say so every call.
        warnings.filterwarnings("ignore", message=".*did not already require gradients")
        for index, ((start, inputs), target) in enumerate(zip(batches, batch_targets, strict=True)):
            for method in resolved:
                records += _score(
                    method,
                    scorers,
                    gate,
                    inputs,
                    target,
                    start,
                    seed + index,
                    max_examples_per_batch,
                )
                bar.update()
    bar.close()
    return Comparison(records, tuple(s.info for s in scorers), tuple(m.name for m in resolved))


def _resolve_methods(methods: Any, gate: TokenGate) -> list[Method]:
    if not isinstance(methods, Mapping):
        raise TypeError(
            f"methods must be a dict of name -> attribution (see standard_methods); got "
            f"{type(methods).__name__}"
        )
    if not methods:
        raise ValueError("methods is empty: pass at least one, e.g. standard_methods(gate)")
    return [_resolve_method(name, spec, gate) for name, spec in methods.items()]


def _per_text_targets(targets: Any, count: int) -> list[Any] | None:
    """``targets`` as a list of one class per text, or ``None`` when they are resolved per batch
    (``"predicted"``, or ``None`` for single-logit models).

    Raises:
        ValueError: not one target per text.
    """
    if targets is None or isinstance(targets, str):
        return None
    return class_indices(targets, count).tolist()


def _score(
    method: Method,
    scorers: Sequence[Metric],
    gate: TokenGate,
    inputs: GatedInputs,
    target: Tensor,
    start: int,
    seed: int,
    max_examples_per_batch: int,
) -> list[dict[str, Any]]:
    """The records of one method on one batch (examples ``start``, ``start + 1``, ...)."""
    began = time.perf_counter()
    attributions = method.attribute(inputs, target)
    seconds = (time.perf_counter() - began) / len(target)
    if tuple(attributions.shape) != tuple(inputs.gate.shape):
        raise ValueError(
            f"method {method.name!r} returned attributions of shape "
            f"{tuple(attributions.shape)}; expected (B, S) = {tuple(inputs.gate.shape)}"
        )
    context = MetricContext(
        forward_func=gate,
        inputs=inputs,
        target=target,
        attributions=attributions,
        explain=method.explanation_function(),
        seed=seed,
        max_examples_per_batch=max_examples_per_batch,
    )
    return [
        {
            "example": start + i,
            "method": method.name,
            "metric": scorer.info.label,
            "value": value,
            "lower_is_better": scorer.info.lower_is_better,
            "seconds": seconds,
            "target": int(target[i]),
        }
        for scorer in scorers
        for i, value in enumerate(scorer(context).tolist())
    ]
