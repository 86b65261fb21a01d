"""Attention rows straight from queries and keys, projected, without the ``n x n`` matrix.

Attention-based attribution usually asks the model for every ``(layer, head, n, n)`` attention
matrix and runs out of memory beyond a few thousand tokens. An explanation needs only a few rows
(the ``[CLS]`` row of an encoder, the last row of a decoder), and each row is a softmax of one
query against all keys. The functions here compute only the requested rows from the layer's
queries and keys (scaling, padding mask, causal mask, grouped-query heads) and project them, so a
single row of one layer costs memory linear in ``n``. They give the same rows as materializing
``softmax(Q K^T * scale + mask)`` and projecting the requested rows of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from captum_effattn._typing import KeyMask
from captum_effattn.projection.certificate import ProjectionCertificate
from captum_effattn.projection.effective import effective_attention
from captum_effattn.projection.efficient import efficient_attention
from captum_effattn.projection.engine.rows import RowMasking, attention_rows_of, visible_keys
from captum_effattn.projection.engine.validation import QKProblem, QueryRows, check_qk_inputs

Rows = QueryRows


def _rows_of(problem: QKProblem, causal: bool, backend: str) -> torch.Tensor:
    masking = RowMasking(key_mask=problem.key_mask, causal=causal)
    return attention_rows_of(
        problem.query, problem.key, problem.rows, masking, problem.scale, backend
    )


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    key_mask: KeyMask | None = None,
    causal: bool = False,
    *,
    rows: Rows = None,
    scaling: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The requested rows of ``softmax(Q K^T * scaling + mask)``, never the whole matrix.

    Args:
        query: ``(*batch, H_q, n_q, d_k)`` the layer's queries (after any rotary embedding).
        key: ``(*batch, H_kv, n, d_k)`` its keys, same dtype; ``H_q`` must be a multiple of
            ``H_kv`` (grouped-query attention: query head ``h`` uses key head
            ``h // (H_q // H_kv)``).
        key_mask: ``(*batch, n)`` booleans (or 0/1), ``True`` for real keys; padding keys get
            probability 0. Default: all keys real.
        causal: query ``i`` attends to keys ``<= i`` only (requires ``n_q == n``).
        rows: query positions to compute: an int, a sequence of ints or a 1-D integer tensor
            (negative values count from the end). Default: all ``n_q`` rows.
        scaling: multiplies the scores; default ``1 / sqrt(d_k)``.
        backend: ``"auto"`` (PyTorch: faster than the Triton kernel where measured),
            ``"torch"`` or ``"triton"`` (CUDA tensors, the ``gpu`` extra).

    Returns:
        ``(*batch, H_q, r, n)`` probabilities in ``query``'s dtype, ``r`` the number of requested
        rows. Computed in float32 (float64 for float64 inputs) whatever the backend.

    Raises:
        TypeError, ValueError: malformed inputs (shapes, dtypes, devices, non-finite values,
            rows out of range), or a requested row that sees no real key.
        KernelUnavailableError: ``backend="triton"`` where the kernel cannot run.
    """
    problem = check_qk_inputs(query, key, None, key_mask, causal, rows, scaling)
    return problem.unflatten(_rows_of(problem, causal, backend)).to(query.dtype)


def _project_from_qk(
    project: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor,
    values: torch.Tensor,
    key_mask: KeyMask | None,
    causal: bool,
    rows: Rows,
    scaling: float | None,
    backend: str,
    options: dict[str, Any],
):
    problem = check_qk_inputs(query, key, values, key_mask, causal, rows, scaling)
    attn = _rows_of(problem, causal, backend)  # (B, H_q, r, n)
    batch, heads, r, n = attn.shape
    kv_heads = problem.key.shape[1]
    # Grouped-query heads share their value head: (B, H_kv, group, r, n) against (B, H_kv, 1, n,
    # d_v), so each value space is factored once.
    attn = attn.view(batch, kv_heads, heads // kv_heads, r, n)
    if problem.values is None:
        raise TypeError("values must be a torch.Tensor of shape (*batch, H_kv, n, d_v); got None")
    values = problem.values[:, :, None]
    real = problem.key_mask
    if real is None:
        real = torch.ones(batch, n, dtype=torch.bool, device=attn.device)
    if causal:
        # A causal row projects onto its own prefix's value space: its visible keys become that
        # row's key mask, one (B, r, n) mask instead of the square layout causal=True needs.
        masking = RowMasking(key_mask=real, causal=True)
        visible = visible_keys(masking, problem.rows[None], problem.query.shape[-2], n)
        attn, values, mask = attn[..., None, :], values[..., None, :, :], visible[:, None, None]
    else:
        mask = real[:, None, None, :]
    result = project(attn, values, mask, backend=backend, **options)
    projected, certificate = result if options.get("return_certificate") else (result, None)
    projected = problem.unflatten(projected.reshape(batch, heads, r, n)).to(query.dtype)
    if certificate is None:
        return projected
    fields = {
        field.name: problem.unflatten(getattr(certificate, field.name).reshape(batch, heads, r))
        for field in dataclasses.fields(ProjectionCertificate)
        if field.name != "tol"
    }
    return projected, dataclasses.replace(certificate, **fields)


def efficient_attention_from_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    values: torch.Tensor,
    key_mask: KeyMask | None = None,
    causal: bool = False,
    *,
    rows: Rows = None,
    scaling: float | None = None,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, ProjectionCertificate]:
    """Efficient attention of selected query rows, computed from queries and keys.

    Equal (up to the solver's tolerance) to materializing ``A = softmax(Q K^T * scaling + mask)``
    and calling :func:`efficient_attention` on ``A[..., rows, :]`` (with ``causal=True``: on the
    whole ``A``, then taking the rows), but only the requested rows are ever formed: memory grows
    linearly with ``n`` for a fixed number of rows.

    Args:
        query: ``(*batch, H_q, n_q, d_k)`` the layer's queries (after any rotary embedding).
        key: ``(*batch, H_kv, n, d_k)`` its keys, same dtype; ``H_q`` a multiple of ``H_kv``.
        values: ``(*batch, H_kv, n, d_v)`` its value vectors, bias included (to account for a
            rank-deficient output projection, pass ``V W_O^h``).
        key_mask: ``(*batch, n)`` booleans (or 0/1), ``True`` for real keys. Default: all real.
        causal: query ``i`` attends to keys ``<= i`` and is projected within the value space of
            its prefix (requires ``n_q == n``).
        rows: query positions to explain: an int, a sequence of ints or a 1-D integer tensor
            (negative values count from the end). Default: all ``n_q`` rows (then the result
            itself is ``n_q x n`` per head).
        scaling: multiplies the scores; default ``1 / sqrt(d_k)``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, for both the attention rows and the
            projection (see :func:`efficient_attention`).
        **options: keyword options of :func:`efficient_attention` (``tol``,
            ``return_certificate``, ``solver``, ...).

    Returns:
        ``(*batch, H_q, r, n)`` efficient attention rows in ``query``'s dtype (attention computed
        in float32, or float64 for float64 inputs; projected in float64); with
        ``return_certificate=True`` a tuple ``(rows, certificate)`` whose fields have shape
        ``(*batch, H_q, r)``.

    Raises:
        TypeError, ValueError: malformed inputs (see :func:`attention_rows`), or bad options.
        KernelUnavailableError: ``backend="triton"`` where the kernels cannot run.
    """
    return _project_from_qk(
        efficient_attention, query, key, values, key_mask, causal, rows, scaling, backend, options
    )


def effective_attention_from_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    values: torch.Tensor,
    key_mask: KeyMask | None = None,
    causal: bool = False,
    *,
    rows: Rows = None,
    scaling: float | None = None,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, ProjectionCertificate]:
    """Effective attention of selected query rows, computed from queries and keys.

    As :func:`efficient_attention_from_qk`, with :func:`effective_attention` as the projection
    (``**options``: its keyword options).
    """
    return _project_from_qk(
        effective_attention, query, key, values, key_mask, causal, rows, scaling, backend, options
    )
