"""Pure tensor math: the three views of an attention row (raw, effective, efficient).

Tensors in, tensors out; no model code. See ``shared/method.md`` for the construction.
"""

from captum_effattn.projection._driver import ConvergenceWarning
from captum_effattn.projection.basis import orthonormal_basis, value_space_basis
from captum_effattn.projection.certificate import ProjectionCertificate
from captum_effattn.projection.effective import effective_attention
from captum_effattn.projection.efficient import efficient_attention

__all__ = [
    "ConvergenceWarning",
    "ProjectionCertificate",
    "effective_attention",
    "efficient_attention",
    "orthonormal_basis",
    "value_space_basis",
]
