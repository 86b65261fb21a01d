"""The Captum-facing API: attribution methods and checks built on efficient attention."""

from captum_effattn.attr._core.efficient_attention_attribution import (
    EfficientAttentionAttribution,
)
from captum_effattn.attr._core.layer_efficient_attention_attribution import (
    LayerEfficientAttentionAttribution,
)
from captum_effattn.attr._reductions import (
    REDUCTIONS,
    PairReduction,
    Reduction,
    RolloutReduction,
    attention_rollout,
)
from captum_effattn.attr._views import VIEWS, View, register_view
from captum_effattn.attr._weightings import WEIGHTINGS, Weighting
from captum_effattn.attr.sufficiency import SufficiencyReport, check_sufficiency

__all__ = [
    "REDUCTIONS",
    "VIEWS",
    "WEIGHTINGS",
    "EfficientAttentionAttribution",
    "LayerEfficientAttentionAttribution",
    "PairReduction",
    "Reduction",
    "RolloutReduction",
    "SufficiencyReport",
    "View",
    "Weighting",
    "attention_rollout",
    "check_sufficiency",
    "register_view",
]
