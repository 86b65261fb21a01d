"""The metrics, each with its metadata: Captum's infidelity and sensitivity_max in token-gate
space, ERASER comprehensiveness and sufficiency (AOPC), deletion and insertion AUC."""

from __future__ import annotations

from collections.abc import Sequence

from captum.metrics import infidelity, sensitivity_max
from torch import Tensor

from captum_effattn.metrics._checks import check_positive_int
from captum_effattn.metrics.base import (
    METRICS,
    Metric,
    MetricContext,
    MetricInfo,
    as_float64,
    register_metric,
    unbounded_above,
)
from captum_effattn.metrics.eraser import (
    ERASER_BINS,
    area_under_curve,
    check_fractions,
    check_target_range,
    erasure_curve,
    perturbation_curve,
)
from captum_effattn.metrics.perturbations import gate_noise, token_removal


def _examples_per_batch(context: MetricContext, samples: int) -> int:
    """Captum's metrics want at least the batch and at most batch * samples per forward pass."""
    batch = context.inputs.gate.shape[0]
    return max(batch, min(context.max_examples_per_batch, batch * samples))


@register_metric
class Infidelity:
    r"""Captum's ``infidelity`` under Bernoulli token removal (:func:`token_removal`).

    ``E[(I^T attr - (f(g) - f(g - I)))^2]`` over random removals ``I``, with ``f`` the target
    logit. With ``normalize=True`` (default) the attributions are first rescaled by the
    least-squares factor, so methods whose scores live on different scales (attention rows sum
    to 1, gradients do not) are compared on how well they *predict* the output changes.

    Args:
        drop_probability: chance that each token is removed in a sample.
        n_perturb_samples: random removals per example.
        normalize: Captum's ``normalize``.
    """

    def __init__(
        self, drop_probability: float = 0.2, n_perturb_samples: int = 10, normalize: bool = True
    ):
        token_removal(drop_probability)  # validates
        self.drop_probability = drop_probability
        self.n_perturb_samples = check_positive_int(n_perturb_samples, "n_perturb_samples")
        self.normalize = normalize
        self.info = MetricInfo(
            name="infidelity",
            lower_is_better=True,
            range=unbounded_above(),
            description="squared error of attributions predicting the logit drop when random "
            "tokens are removed",
            parameters={
                "drop_probability": drop_probability,
                "n_perturb_samples": n_perturb_samples,
                "normalize": normalize,
            },
        )

    def __call__(self, context: MetricContext) -> Tensor:
        gate = context.inputs.gate

        def forward_in_float64(*args):
            # Normalized infidelity is b^2 - (ab)^2 / a^2: in float32 the cancellation leaves
            # errors of 1e-6 (negative ones too) where the attributions predict the output well.
            logits = context.forward_func(*args)
            # Captum indexes these outputs at target: name a bad class before it does.
            if logits.dim() > 1 and logits.shape[-1] > 1:
                check_target_range(context.target, logits.shape[-1])
            return logits.double()

        values = infidelity(
            forward_in_float64,
            token_removal(self.drop_probability, seed=context.seed),
            gate,
            context.attributions.detach().double(),
            additional_forward_args=context.inputs.additional_forward_args,
            target=context.target,
            n_perturb_samples=self.n_perturb_samples,
            max_examples_per_batch=_examples_per_batch(context, self.n_perturb_samples),
            normalize=self.normalize,
        )
        return as_float64(values).clamp_min(0.0)  # a mean of squares: below 0 only by rounding


@register_metric
class SensitivityMax:
    r"""Captum's ``sensitivity_max`` under gate noise (:func:`gate_noise`).

    The largest relative change ``||attr(g') - attr(g)|| / ||attr(g)||`` when every token is
    faded toward the baseline by up to ``radius``; the method is re-run on each perturbed input.

    Args:
        radius: the gate-noise radius, in ``(0, 1]``.
        n_perturb_samples: perturbed inputs per example (each re-runs the method).
        norm_ord: Captum's ``norm_ord``.
    """

    def __init__(self, radius: float = 0.1, n_perturb_samples: int = 5, norm_ord: str = "fro"):
        gate_noise(radius)  # validates
        self.radius = radius
        self.n_perturb_samples = check_positive_int(n_perturb_samples, "n_perturb_samples")
        self.norm_ord = norm_ord
        self.info = MetricInfo(
            name="sensitivity_max",
            lower_is_better=True,
            range=unbounded_above(),
            description="largest relative change of the attributions when tokens are faded "
            "slightly toward the baseline token",
            parameters={"radius": radius, "n_perturb_samples": n_perturb_samples},
        )

    def __call__(self, context: MetricContext) -> Tensor:
        values = sensitivity_max(
            context.explain,
            context.inputs.gate,
            perturb_func=gate_noise(self.radius, seed=context.seed),
            n_perturb_samples=self.n_perturb_samples,
            norm_ord=self.norm_ord,
            max_examples_per_batch=_examples_per_batch(context, self.n_perturb_samples),
            target=context.target,
            additional_forward_args=context.inputs.additional_forward_args,
        )
        return as_float64(values)


class _Erasure:
    """AOPC over bins of top tokens removed (comprehensiveness) or kept alone (sufficiency)."""

    name: str
    keep_top: bool
    lower_is_better: bool
    action: str

    def __init__(self, bins: Sequence[float] = ERASER_BINS):
        self.bins = check_fractions(bins, "bins")
        self.info = MetricInfo(
            name=self.name,
            lower_is_better=self.lower_is_better,
            range=(-1.0, 1.0),
            description=f"drop of the target probability when {self.action} (AOPC over bins)",
            parameters={"bins": self.bins},
        )

    def __call__(self, context: MetricContext) -> Tensor:
        inputs = context.inputs
        curve = erasure_curve(
            context.forward_func,
            inputs.gate,
            context.attributions,
            inputs.removable,
            context.target,
            inputs.additional_forward_args,
            bins=self.bins,
            keep_top=self.keep_top,
            max_examples_per_batch=context.max_examples_per_batch,
        )
        return as_float64(curve.mean(-1))


@register_metric
class Comprehensiveness(_Erasure):
    """ERASER comprehensiveness, AOPC over ``bins`` (fractions of the removable tokens)."""

    name, keep_top, lower_is_better = "comprehensiveness", False, False
    action = "the top tokens are removed"


@register_metric
class Sufficiency(_Erasure):
    """ERASER sufficiency, AOPC over ``bins`` (fractions of the removable tokens)."""

    name, keep_top, lower_is_better = "sufficiency", True, True
    action = "only the top tokens are kept"


class _CurveArea:
    """Area under the deletion or insertion curve of the target probability."""

    insertion: bool

    def __init__(self, steps: int = 10):
        self.steps = check_positive_int(steps, "steps")
        name = "insertion_auc" if self.insertion else "deletion_auc"
        action = "put back into an empty text" if self.insertion else "removed"
        self.info = MetricInfo(
            name=name,
            lower_is_better=not self.insertion,
            range=(0.0, 1.0),
            description=f"area under the target probability as the top tokens are {action}",
            parameters={"steps": self.steps},
        )

    def __call__(self, context: MetricContext) -> Tensor:
        inputs = context.inputs
        fractions, curve = perturbation_curve(
            context.forward_func,
            inputs.gate,
            context.attributions,
            inputs.removable,
            context.target,
            inputs.additional_forward_args,
            steps=self.steps,
            insertion=self.insertion,
            max_examples_per_batch=context.max_examples_per_batch,
        )
        return as_float64(area_under_curve(fractions, curve))


@register_metric
class DeletionAUC(_CurveArea):
    """Area under the deletion curve (lower is better)."""

    insertion = False


@register_metric
class InsertionAUC(_CurveArea):
    """Area under the insertion curve (higher is better)."""

    insertion = True


def default_metrics() -> list[Metric]:
    """One of each registered metric, with its default parameters."""
    return [metric() for metric in METRICS.values()]
