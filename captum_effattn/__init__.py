"""captum_effattn: efficient attention (Naim & Asher, ECAI 2024) for Captum.

The public namespace is deliberately thin; see the README for a tour.
"""

from captum_effattn.attr import EfficientAttentionAttribution, LayerEfficientAttentionAttribution
from captum_effattn.attr._core.llm_efficient_attention_attribution import (
    LLMEfficientAttentionAttribution,
)
from captum_effattn.projection import (
    ConvergenceWarning,
    ProjectionCertificate,
    effective_attention,
    efficient_attention,
    minimal_attention,
    necessary_keys,
)

__version__ = "0.1.0.dev0"

# Dataset explanation imports pyarrow; load it on first use, not with the package.
_DATASET_NAMES = ("explain_dataset", "load_attributions")


def __getattr__(name: str):
    if name in _DATASET_NAMES:
        from captum_effattn import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConvergenceWarning",
    "EfficientAttentionAttribution",
    "LLMEfficientAttentionAttribution",
    "LayerEfficientAttentionAttribution",
    "ProjectionCertificate",
    "__version__",
    "effective_attention",
    "efficient_attention",
    "explain_dataset",
    "load_attributions",
    "minimal_attention",
    "necessary_keys",
]
