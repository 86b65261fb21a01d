"""Pure tensor math: the views of an attention row (raw, effective, efficient, minimal).

Tensors in, tensors out; no model code. For the construction, see the method page of the
documentation (docs/method.md).

Layers: the public functions live in the modules at this level (:mod:`.efficient`,
:mod:`.effective`, :mod:`.minimal`, :mod:`.from_qk`, :mod:`.certificate`, :mod:`.basis`);
:mod:`.engine` holds the machinery they share (attention rows, validation, backends, driver,
layout, grouped products, threads) and :mod:`.solvers` the solvers (Newton, interior point, the
compiled kernels; the vertex simplex of minimal attention).
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
from captum_effattn.projection.minimal import minimal_attention, necessary_keys

__all__ = [
    "ConvergenceWarning",
    "ProjectionCertificate",
    "attention_rows",
    "effective_attention",
    "effective_attention_from_qk",
    "efficient_attention",
    "efficient_attention_from_qk",
    "minimal_attention",
    "necessary_keys",
    "orthonormal_basis",
    "value_space_basis",
]
