"""Minimal attention: a vertex of the valid set, and the keys every valid row needs.

For an attention row ``a`` over ``n`` keys and value vectors ``V`` (``n x d``), the valid rows

    P(a) = { x : x >= 0, sum(x) = 1, x V = a V }

form a polytope; efficient attention is its minimum-norm point. A *vertex* of ``P(a)`` uses as few
keys as the value space allows: at most ``rank([1, V])`` of them (at most ``d + 1``), each needed by
that vertex (its supported columns of ``[1, V]^T`` are linearly independent, so no supported key can
be dropped and compensated by the others). Vertices are not unique; :func:`minimal_attention`
returns, among the vertices that use only keys the efficient row uses, the one maximizing
``sum_j x_j log efficient(a)_j``: its mass sits on the keys the efficient row weights most. Which
keys are needed by *every* valid row is another question: :func:`necessary_keys` answers it (on
long inputs it is rarely any). See the method page of the documentation (docs/method.md).

Both solve small linear programs exactly, one row at a time on the CPU in float64 (numpy): a
purification of the efficient row to a vertex, then the primal simplex method
(:mod:`captum_effattn.projection.solvers.vertex`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from captum_effattn._typing import AttentionRows, KeyMask, ValueVectors
from captum_effattn.projection.basis import value_space_basis
from captum_effattn.projection.certificate import ProjectionCertificate
from captum_effattn.projection.efficient import efficient_attention
from captum_effattn.projection.engine.backends import Backend
from captum_effattn.projection.engine.driver import ChunkResult, ConvergenceWarning, project_rows
from captum_effattn.projection.engine.layout import Chunk
from captum_effattn.projection.engine.validation import DISTRIBUTION_TOL, check_distributions
from captum_effattn.projection.solvers.vertex import (
    Vertex,
    complete_basis,
    independent_rows,
    purify,
    simplex,
)

SIMPLEX_TOL = 1e-12
# A key is strictly necessary when no valid row gives it less than this weight.
NECESSARY_TOL = 1e-10


@dataclass(frozen=True)
class _RowProblem:
    """One row's linear program over its ``m`` real keys ``keys``."""

    keys: np.ndarray  # (m,) positions of the real keys
    a_matrix: np.ndarray  # (r, m) the orthonormal basis of span([1, V]) transposed
    a: np.ndarray  # (m,) the row, renormalized over its real keys
    efficient: np.ndarray  # (m,) its efficient row, the objective

    @property
    def b(self) -> np.ndarray:
        return self.a_matrix @ self.a


def _minimal_vertex(problem: _RowProblem) -> tuple[Vertex, np.ndarray]:
    """The vertex of the efficient row's face maximizing ``sum_j x_j log e_j``, and the positions
    (among the real keys) of the keys it was chosen from: the efficient row's support."""
    used = np.flatnonzero(problem.efficient > 0)
    a_matrix, b = independent_rows(problem.a_matrix[:, used], problem.b)
    e = problem.efficient[used]
    objective = np.log(e)
    start = complete_basis(a_matrix, purify(a_matrix, e, objective))
    return simplex(a_matrix, b, objective, start), used


def _lift(problem: _RowProblem, vertex: Vertex, used: np.ndarray) -> Vertex:
    """A vertex of the efficient row's face as a vertex of the whole valid set (basis
    completed over every real key)."""
    x = np.zeros(len(problem.keys))
    x[used] = vertex.x
    lifted = Vertex(x=x, basis=used[vertex.basis].tolist(), steps=vertex.steps)
    return complete_basis(problem.a_matrix, lifted)


def _necessary(problem: _RowProblem, vertex: Vertex) -> tuple[np.ndarray, bool]:
    """Whether each real key is positive in every valid row (``min x_j > 0`` over ``P``), and
    whether every linear program finished.

    Only the vertex's support can hold such keys; a key seen at zero in any vertex visited on the
    way is not one, without a linear program of its own.
    """
    m = len(problem.keys)
    seen_zero = vertex.x <= 0
    necessary = np.zeros(m, dtype=bool)
    finished = True
    for key in np.flatnonzero(~seen_zero).tolist():
        if seen_zero[key]:
            continue
        objective = np.zeros(m)
        objective[key] = -1.0
        lowest = simplex(problem.a_matrix, problem.b, objective, vertex)
        finished &= lowest.optimal
        seen_zero |= lowest.x <= 0
        necessary[key] = lowest.x[key] > NECESSARY_TOL
    return necessary, finished


@dataclass
class _Outcome:
    """What the chunks leave beside the rows: per flat row, LP finished and necessary keys."""

    finished: torch.Tensor  # (R,) bool
    necessary: torch.Tensor | None  # (R, n) bool, when asked for


def _row_problems(
    chunk: Chunk,
    row_mask: torch.Tensor,
    a: torch.Tensor,
    efficient: np.ndarray,
    rank_rtol: float | None,
) -> Iterator[tuple[int, _RowProblem]]:
    """The linear program of each row of the chunk, in numpy on the CPU."""
    basis, rank = value_space_basis(chunk.values, chunk.key_mask, with_ones=True, rtol=rank_rtol)
    bases, ranks = basis.cpu().numpy(), rank.cpu().tolist()
    a_cpu, masks, groups = a.cpu().numpy(), row_mask.cpu().numpy(), chunk.group.cpu().tolist()
    for i in range(len(a_cpu)):
        keys = np.flatnonzero(masks[i])
        g = groups[i]
        yield (
            i,
            _RowProblem(
                keys=keys,
                a_matrix=bases[g][keys, : ranks[g]].T,
                a=a_cpu[i, keys],
                efficient=efficient[i, keys],
            ),
        )


def _solve_chunk(
    chunk: Chunk,
    row_mask: torch.Tensor,
    efficient: torch.Tensor,
    outcome: _Outcome,
    rank_rtol: float | None,
) -> ChunkResult:
    """Minimal rows of one chunk (and their necessary keys when ``outcome`` asks for them)."""
    raw = chunk.rows * row_mask
    a = raw / raw.sum(-1, keepdim=True)
    n_c = a.shape[-1]
    efficient_c = efficient[chunk.row_ids.cpu(), :n_c].numpy()
    x = np.zeros((len(a), n_c))
    steps = torch.zeros(len(a), dtype=torch.long)
    ids = chunk.row_ids.cpu().tolist()
    unchanged = torch.zeros(len(a), dtype=torch.bool)
    for i, problem in _row_problems(chunk, row_mask, a, efficient_c, rank_rtol):
        # [1, V] spans every real key (rank = number of real keys): P(a) = {a}.
        if problem.a_matrix.shape[0] == len(problem.keys):
            unchanged[i] = True
            if outcome.necessary is not None:
                outcome.necessary[ids[i], problem.keys] = torch.from_numpy(problem.a > 0)
            continue
        vertex, used = _minimal_vertex(problem)
        x[i, problem.keys[used]] = vertex.x / vertex.x.sum()
        steps[i] = vertex.steps
        finished = vertex.optimal
        if outcome.necessary is not None:
            necessary, finished_all = _necessary(problem, _lift(problem, vertex, used))
            outcome.necessary[ids[i], problem.keys] = torch.from_numpy(necessary)
            finished &= finished_all
        outcome.finished[ids[i]] = finished
    unchanged = unchanged.to(a.device)
    rows = torch.where(unchanged[:, None], raw, torch.from_numpy(x).to(a.device))
    return ChunkResult(
        rows=rows,
        reference=torch.where(unchanged[:, None], raw, a),
        iterations=steps.to(a.device),
        unchanged=unchanged,
    )


def _vertices(
    name: str,
    attn: AttentionRows,
    values: ValueVectors,
    key_mask: KeyMask | None,
    causal: bool,
    *,
    tol: float,
    rank_rtol: float | None,
    distribution_tol: float | None,
    backend: str,
    with_necessary: bool,
) -> tuple[torch.Tensor, ProjectionCertificate, torch.Tensor | None]:
    """Minimal rows, their certificate and (``with_necessary``) the necessary keys."""
    if not tol > 0:
        raise ValueError(f"tol must be positive; got {tol}")
    limit = distribution_tol
    if limit is None and isinstance(attn, torch.Tensor):
        limit = DISTRIBUTION_TOL.get(attn.dtype)
    as_double = (
        (attn.double(), values.double())
        if isinstance(attn, torch.Tensor) and isinstance(values, torch.Tensor)
        else (attn, values)
    )
    # The objective: efficient rows in float64 (they also validate every input).
    efficient = efficient_attention(
        *as_double,
        key_mask,
        causal,
        tol=tol,
        rank_rtol=rank_rtol,
        distribution_tol=limit,
        backend=backend,
    )
    assert isinstance(efficient, torch.Tensor)
    flat_efficient = efficient.reshape(-1, efficient.shape[-1]).cpu()
    rows_total, n = flat_efficient.shape
    outcome = _Outcome(
        finished=torch.ones(rows_total, dtype=torch.bool),
        necessary=torch.zeros(rows_total, n, dtype=torch.bool) if with_necessary else None,
    )

    def validate(layout, row_masks):
        check_distributions(layout.rows, row_masks, limit, attn.shape, layout.row_index)

    def solve(chunk: Chunk, row_mask: torch.Tensor, chosen: Backend) -> ChunkResult:
        return _solve_chunk(chunk, row_mask, flat_efficient, outcome, rank_rtol)

    rows, certificate = project_rows(
        name,
        attn,
        values,
        key_mask,
        causal,
        rank_width=values.shape[-1] + 1,
        solve_chunk=solve,
        tol=tol,
        simplex_tol=SIMPLEX_TOL,
        validate_rows=validate,
        backend=backend,
    )
    finished = outcome.finished.to(certificate.converged.device).reshape(
        certificate.converged.shape
    )
    if not bool(finished.all()):
        warnings.warn(
            f"{name}: the linear programs of {int((~finished).sum())} row(s) reached their pivot "
            "limit; those rows are valid vertices but may not be the documented one (see the "
            "certificate's converged flags)",
            ConvergenceWarning,
            stacklevel=3,
        )
        certificate = replace(certificate, converged=certificate.converged & finished)
    necessary = None
    if outcome.necessary is not None:
        necessary = outcome.necessary.reshape(rows.shape).to(rows.device)
    return rows, certificate, necessary


def minimal_attention(
    attn: AttentionRows,
    values: ValueVectors,
    key_mask: KeyMask | None = None,
    causal: bool = False,
    *,
    tol: float = 1e-9,
    return_certificate: bool = False,
    rank_rtol: float | None = None,
    distribution_tol: float | None = None,
    backend: str = "auto",
) -> AttentionRows | tuple[AttentionRows, ProjectionCertificate]:
    """Minimal attention: a valid attention row with as few keys as the head's value space allows.

    Each row ``a`` of ``attn`` is replaced by a vertex ``x`` of ``P(a) = {x >= 0, sum(x) = 1,
    x V = a V}``: a probability distribution over the real keys that reproduces the head output
    ``a V``, with at most ``rank([1, V])`` non-zero keys (at most ``d + 1``), each needed by that
    row: the supported columns of ``[1, V]^T`` are linearly independent, so no supported key can be
    removed and compensated by the others.

    Vertices are not unique. The rule, with ``e = efficient(a)`` (:func:`efficient_attention`):
    **among the valid rows that use only keys** ``e`` **uses** (the face of ``P(a)`` holding ``e``),
    **the vertex maximizing** ``sum_j x_j log e_j``, so the mass sits on the keys the efficient row
    weights most, and every key of the minimal row is a key of the efficient row. (Maximizing
    ``<x, e>`` over ``P(a)`` instead would do the opposite: since ``e = relu(B theta)`` with ``B``
    a basis of ``span([1, V])``, and ``B^T x`` is the same for every valid row, ``<x, e> =
    ||e||^2 + sum_j x_j max(-(B theta)_j, 0)``, constant on that face and largest on keys ``e``
    leaves out.)

    It is computed exactly, one linear program per row: the efficient row is purified to a vertex
    (keys visited in key order; each key whose column of ``[1, V]^T`` depends on the kept ones opens
    a null-space direction, followed, in the sense that does not decrease the objective, until a
    key reaches zero, the smallest index among ties), then the primal simplex method climbs to the
    optimum (Dantzig's rule, Bland's lowest-index rule after a degenerate pivot; ties in the ratio
    test leave the lowest key). When several vertices attain the maximum (not the case for rows in
    general position), the one this deterministic walk reaches is returned. The result depends on
    the row and its values alone, not on the batch it comes in nor on the batch's order. A row
    whose ``[1, V]`` spans every real key (generically ``n <= d + 1``) is its only valid row and
    comes back as given.

    Unlike efficient attention the vertex is not a continuous function of the row: a small change
    of ``a`` can switch the optimal vertex. Whether a key is needed by *every* valid row is
    :func:`necessary_keys`.

    Args:
        attn: ``(*batch, q, n)`` post-softmax attention rows, each a probability distribution over
            the row's real keys (within ``distribution_tol``; renormalized in float64).
        values: ``(*batch, n, d)`` the head's value vectors, bias included. Its leading dimensions
            broadcast to ``attn``'s (never the other way): pass ``(B, H_kv, 1, n, d)`` against
            attention ``(B, H_kv, group, q, n)`` for grouped-query attention. To account for a
            rank-deficient output projection, pass ``V W_O^h``.
        key_mask: ``(*batch, n)`` booleans (or 0/1), ``True`` for real keys. Padding keys get
            exactly 0 weight. Default: all keys real.
        causal: row ``i`` may use keys ``<= i`` only, and its vertex is one of its own prefix's
            valid set (requires ``q == n``).
        tol: relative head-output error a row must reach to count as converged (for the efficient
            rows of the objective and for the returned vertices).
        return_certificate: also return a :class:`ProjectionCertificate` (output error, simplex
            violation, purification steps plus simplex pivots as ``iterations``, convergence).
        rank_rtol: relative tolerance for the rank of ``[V, 1]`` (see
            :func:`efficient_attention`).
        distribution_tol: how far an input row may be from a distribution (default by dtype, as
            :func:`efficient_attention`).
        backend: the backend of the efficient rows and of the value-space bases (see
            :func:`efficient_attention`); the linear programs run on the CPU in any case.

    Returns:
        Rows shaped like ``attn``, in its dtype, detached; with ``return_certificate=True`` a tuple
        ``(rows, certificate)``.

    Raises:
        TypeError, ValueError: malformed inputs (see :func:`efficient_attention`), or a row that is
            not a probability distribution over its real keys.
        KernelUnavailableError: a named ``backend`` that cannot run here.

    Warns:
        ConvergenceWarning: a row missed ``tol`` (efficient row or vertex), or its linear program
            reached the pivot limit; the certificate says which.
    """
    rows, certificate, _ = _vertices(
        "minimal_attention",
        attn,
        values,
        key_mask,
        causal,
        tol=tol,
        rank_rtol=rank_rtol,
        distribution_tol=distribution_tol,
        backend=backend,
        with_necessary=False,
    )
    return (rows, certificate) if return_certificate else rows


def necessary_keys(
    attn: AttentionRows,
    values: ValueVectors,
    key_mask: KeyMask | None = None,
    causal: bool = False,
    *,
    rank_rtol: float | None = None,
    distribution_tol: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The keys every valid row needs: positive in every row of ``P(a)``.

    Key ``j`` of row ``a`` is *strictly necessary* when ``min x_j`` over ``P(a) = {x >= 0,
    sum(x) = 1, x V = a V}`` exceeds ``1e-10``: no attention row the model cannot tell apart from
    ``a`` does without it. Each candidate is decided by an exact linear program (the simplex method
    from the row's minimal vertex, :func:`minimal_attention`); only that vertex's keys can be
    necessary, and keys found at zero on the way need no program of their own. On long inputs
    (``n`` much larger than ``d + 1``) necessary keys are rare: minimality is a property of a
    chosen vertex, not of the token set. Where ``[1, V]`` spans every real key, ``P(a) = {a}`` and
    every positive key is necessary.

    Args:
        attn: ``(*batch, q, n)`` attention rows (as :func:`minimal_attention`).
        values: ``(*batch, n, d)`` value vectors (as :func:`minimal_attention`).
        key_mask: ``(*batch, n)`` real keys; padding keys are never necessary.
        causal: row ``i`` may use keys ``<= i`` only (requires ``q == n``).
        rank_rtol, distribution_tol, backend: as :func:`minimal_attention`.

    Returns:
        ``(*batch, q, n)`` booleans, on ``attn``'s device.

    Raises:
        TypeError, ValueError: malformed inputs (see :func:`minimal_attention`).

    Warns:
        ConvergenceWarning: a linear program reached its pivot limit (its key is reported as not
            necessary).
    """
    _, _, necessary = _vertices(
        "necessary_keys",
        attn,
        values,
        key_mask,
        causal,
        tol=1e-9,
        rank_rtol=rank_rtol,
        distribution_tol=distribution_tol,
        backend=backend,
        with_necessary=True,
    )
    assert necessary is not None
    return necessary
