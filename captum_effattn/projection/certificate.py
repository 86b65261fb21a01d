"""Per-row evidence that a projected attention row is what it claims to be."""

from __future__ import annotations

from dataclasses import dataclass

from captum_effattn._typing import RowStatistic


@dataclass(frozen=True)
class ProjectionCertificate:
    """Per-row accuracy report of :func:`efficient_attention` or :func:`effective_attention`.

    Every field has the leading shape of the returned attention without its last dimension,
    ``(*batch, q)``: one entry per projected row. Numbers are computed in float64 from the returned
    rows before they are cast to the input's dtype.

    Attributes:
        output_error: relative head-output error ``||x V - a V|| / ||a V||`` of the returned row
            ``x`` against the input row ``a`` (renormalized over its real keys for efficient
            attention), with the ``values`` that were passed in (computed on them scaled to unit
            magnitude per head, which leaves the ratio unchanged and keeps it meaningful at any
            scale).
        simplex_violation: how far ``x`` is from a probability distribution over the row's real
            keys: the largest of ``-min(x)``, ``|sum(x) - 1|`` and the mass on masked keys. Zero up
            to rounding for efficient attention; effective attention is not a distribution, and
            this field says by how much.
        iterations: solver iterations spent on the row (0 when the row needed none).
        converged: ``output_error <= tol`` and, for efficient attention, ``simplex_violation <=
            1e-12``.
        tol: the output-error tolerance the rows were held to.
    """

    output_error: RowStatistic
    simplex_violation: RowStatistic
    iterations: RowStatistic
    converged: RowStatistic
    tol: float

    @property
    def all_converged(self) -> bool:
        """Whether every row met the tolerance."""
        return bool(self.converged.all())

    @property
    def max_output_error(self) -> float:
        return float(self.output_error.max()) if self.output_error.numel() else 0.0

    def summary(self) -> str:
        """One line for logs: rows, failures, worst errors, iteration counts."""
        if self.iterations.numel() == 0:
            return "0 rows"
        its = self.iterations.double()
        return (
            f"{self.converged.numel()} rows, {int((~self.converged).sum())} not converged; "
            f"max output error {self.max_output_error:.2e}, max simplex violation "
            f"{float(self.simplex_violation.max()):.2e}; iterations median "
            f"{float(its.median()):.0f}, max {int(its.max())}"
        )
