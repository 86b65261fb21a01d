"""Pure tensor math: the three views of an attention row (raw, effective, efficient).

Tensors in, tensors out; no model code. For the construction, see the method page of the
documentation (docs/method.md).

Layers: the public functions live in the modules at this level (:mod:`.efficient`,
:mod:`.effective`, :mod:`.from_qk`, :mod:`.certificate`, :mod:`.basis`); :mod:`.engine` holds the
machinery they share (attention rows, validation, backends, driver, layout, grouped products,
threads) and :mod:`.solvers` the solvers of efficient attention (Newton, interior point, the
compiled kernels).
"""

from captum_effattn.projection.basis import orthonormal_basis, value_space_basis
from captum_effattn.projection.certificate import ProjectionCertificate
from captum_effattn.projection.effective import effective_attention
from captum_effattn.projection.efficient import efficient_attention
from captum_effattn.projection.engine.driver import ConvergenceWarning
from captum_effattn.projection.from_qk import (
    attention_rows,
    effective_attention_from_qk,
    efficient_attention_from_qk,
)

__all__ = [
    "ConvergenceWarning",
    "ProjectionCertificate",
    "attention_rows",
    "effective_attention",
    "effective_attention_from_qk",
    "efficient_attention",
    "efficient_attention_from_qk",
    "orthonormal_basis",
    "value_space_basis",
]
