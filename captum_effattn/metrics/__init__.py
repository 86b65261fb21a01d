"""Score efficient attention next to IntegratedGradients and Saliency.

- :mod:`~captum_effattn.metrics.token_gate`: a common token-level input space (the token gate)
  in which every Captum method returns ``(B, S)`` token scores and Captum's metrics apply.
- :mod:`~captum_effattn.metrics.perturbations`: token removal for ``captum.metrics.infidelity``,
  gate noise for ``captum.metrics.sensitivity_max``, and explanation-function wrappers.
- :mod:`~captum_effattn.metrics.eraser`: ERASER comprehensiveness / sufficiency (AOPC) and
  deletion / insertion curves, as pure functions of a forward function.
- :mod:`~captum_effattn.metrics.scores`: every metric as an object that carries its metadata
  (:class:`MetricInfo`: name, range, direction, parameters), in a registry by name.
- :mod:`~captum_effattn.metrics.compare`: :func:`compare_methods`, the tidy table.
"""

from captum_effattn.metrics.base import (
    METRICS,
    Metric,
    MetricContext,
    MetricInfo,
    get_metric,
    register_metric,
)
from captum_effattn.metrics.compare import (
    Comparison,
    Method,
    compare_methods,
    resolve_targets,
    standard_methods,
)
from captum_effattn.metrics.eraser import ERASER_BINS
from captum_effattn.metrics.perturbations import explanation_function, gate_noise, token_removal
from captum_effattn.metrics.scores import (
    Comprehensiveness,
    DeletionAUC,
    Infidelity,
    InsertionAUC,
    SensitivityMax,
    Sufficiency,
    default_metrics,
)
from captum_effattn.metrics.token_gate import GatedInputs, TokenGate, gated_inputs

__all__ = [
    "ERASER_BINS",
    "METRICS",
    "Comparison",
    "Comprehensiveness",
    "DeletionAUC",
    "GatedInputs",
    "Infidelity",
    "InsertionAUC",
    "Method",
    "Metric",
    "MetricContext",
    "MetricInfo",
    "SensitivityMax",
    "Sufficiency",
    "TokenGate",
    "compare_methods",
    "default_metrics",
    "explanation_function",
    "gate_noise",
    "gated_inputs",
    "get_metric",
    "register_metric",
    "resolve_targets",
    "standard_methods",
    "token_removal",
]
