"""Model plumbing: find, capture and replace attention in unmodified Hugging Face models.

- :mod:`~captum_effattn.models.architectures`: registry of supported architectures
  (``config.model_type`` -> where the self-attention modules are, heads, causality, inputs).
- :mod:`~captum_effattn.models.selection`: which layers and heads, validated against the model.
- :mod:`~captum_effattn.models.capture`: ``capture_attention``, recording attention probabilities,
  per-head values and real keys during a forward pass, optionally replacing the probabilities.
- :mod:`~captum_effattn.models.carryover`: keeps a capture's tensors until the next capture
  replaces them, so their memory is reused in place (what the attribution methods do per thread).
"""

from captum_effattn.models.architectures import (
    ARCHITECTURES,
    ArchitectureSpec,
    ModelArchitecture,
    UnsupportedModelError,
    describe_model,
    register_architecture,
)
from captum_effattn.models.capture import (
    AttentionRecord,
    AttentionTransform,
    CapturedHeads,
    capture_attention,
)
from captum_effattn.models.carryover import (
    CaptureCarryover,
    release_thread_carryover,
    thread_carryover,
)
from captum_effattn.models.selection import HeadSelection, select_heads

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "AttentionRecord",
    "AttentionTransform",
    "CaptureCarryover",
    "CapturedHeads",
    "HeadSelection",
    "ModelArchitecture",
    "UnsupportedModelError",
    "capture_attention",
    "describe_model",
    "register_architecture",
    "release_thread_carryover",
    "select_heads",
    "thread_carryover",
]
