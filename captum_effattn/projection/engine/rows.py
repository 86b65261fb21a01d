"""Attention rows from queries and keys: the one implementation of the masking conventions.

``softmax(q_i K^T * scale + mask)`` for selected query rows ``i``, used by capture
(:mod:`captum_effattn.models.capture`), the ``*_from_qk`` functions
(:mod:`captum_effattn.projection.from_qk`) and, through the backends, the Triton kernel
(:mod:`captum_effattn.kernels.attention`), which implements the same function on GPUs.

Conventions (shared by every implementation):

- Scores are scaled by ``scale`` and computed in float32 (float64 for float64 inputs), whatever the
  input dtype; the result is in that working dtype.
- Grouped-query heads: query head ``h`` reads key head ``h // (H_q // H_kv)``, as Hugging Face's
  ``repeat_kv`` arranges them; keys are never repeated.
- Padding: ``key_mask`` ``(B, n)`` marks the real keys; the others get probability exactly 0.
- Causal: the ``n_q`` queries are the *last* ``n_q`` of the ``n`` positions, so query ``i`` sees
  keys ``j <= i + (n - n_q)`` (the offset is 0 when ``n_q == n``, as in self-attention; a decoder
  step with a cache has ``n_q < n``).
- Windows (hook): ``key_ranges(positions) -> (lo, hi)`` restricts query ``i`` to keys
  ``lo <= j < hi`` on top of the above.
- A row that sees no key at all (a padding query before the first real token under left padding)
  is all zeros, as in ``torch``'s ``sdpa``: explicitly, never NaN. Callers that need every row to
  see a key check that beforehand (:func:`.validation.check_qk_inputs`).

Memory: rows are computed in chunks whose scores, probabilities and masks stay below
:data:`ROWS_CHUNK_BYTES`; masks are built per chunk from index comparisons, so one query row costs
``O(n)`` memory and the ``(n_q, n)`` mask is never formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Scores and probabilities of one chunk of rows stay below this many bytes.
ROWS_CHUNK_BYTES = 64 * 2**20

KeyRanges = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``key_ranges(positions (B or 1, c)) -> (lo, hi)``, each broadcastable to ``(B, c)``: query
``i`` may see keys ``lo <= j < hi`` only (a hook for sliding windows)."""


@dataclass(frozen=True)
class RowMasking:
    """What each query row may see, besides the scores themselves.

    Attributes:
        key_mask: ``(B, n)`` bool, ``True`` for real keys; ``None`` when every key is real.
        causal: query ``i`` of ``n_q`` sees keys ``j <= i + n - n_q`` only.
        additive: a float mask ``(B or 1, H_q or 1, n_q, n)`` added to the scores (a user's 4D
            mask), or ``None``.
        key_ranges: the window hook (see :data:`KeyRanges`), or ``None``.
    """

    key_mask: torch.Tensor | None = None
    causal: bool = False
    additive: torch.Tensor | None = None
    key_ranges: KeyRanges | None = None


def causal_offset(q_len: int, k_len: int) -> int:
    """How many keys precede the first query: query ``i`` sees keys ``j <= i + offset``."""
    return k_len - q_len


def visible_keys(
    masking: RowMasking, positions: torch.Tensor, q_len: int, k_len: int
) -> torch.Tensor:
    """The keys each of a chunk of query rows may see, from index comparisons.

    Args:
        masking: the padding, causal and window rules.
        positions: ``(B or 1, c)`` query positions in ``[0, q_len)``.
        q_len: ``n_q``, the number of queries (for the causal offset).
        k_len: ``n``, the number of keys.

    Returns:
        ``(B or 1, c, n)`` booleans, ``True`` where the query may attend.
    """
    keys = torch.arange(k_len, device=positions.device)
    visible = torch.ones(1, 1, k_len, dtype=torch.bool, device=positions.device)
    if masking.key_mask is not None:
        visible = masking.key_mask[:, None, :]
    if masking.causal:
        last = positions + causal_offset(q_len, k_len)
        visible = visible & (keys <= last[..., None])
    if masking.key_ranges is not None:
        lo, hi = masking.key_ranges(positions)
        visible = visible & (keys >= lo[..., None]) & (keys < hi[..., None])
    return visible.expand(-1, positions.shape[-1], -1)


def gather_rows(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``states (B, H, S, w)`` at ``positions (B or 1, c)`` -> ``(B, H, c, w)``."""
    if positions.shape[0] == 1:
        return states.index_select(2, positions[0])
    index = positions[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])
    return states.expand(positions.shape[0], -1, -1, -1).gather(2, index)


def _chunk_rows(batch: int, heads: int, k_len: int, itemsize: int) -> int:
    # Scores, probabilities and the mask of a chunk: about three (B, H_q, c, n) tensors.
    return max(1, ROWS_CHUNK_BYTES // max(1, 3 * batch * heads * k_len * itemsize))


def _softmax_rows(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Masked softmax over the last axis; rows without a visible key come out all zeros.

    Hidden keys get ``-inf``, except in rows that see nothing, which are left unmasked (so no
    ``inf - inf`` and no NaN, also in gradients) and zeroed afterwards.
    """
    seen = visible.any(-1, keepdim=True)
    probabilities = scores.masked_fill(~visible & seen, -torch.inf).softmax(-1)
    return probabilities if bool(seen.all()) else probabilities * seen


def attention_rows_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    masking: RowMasking,
    scale: float,
) -> torch.Tensor:
    """Selected rows of ``softmax(Q K^T * scale + mask)`` in PyTorch, chunked over rows.

    Args:
        query: ``(B, H_q, n_q, d_k)`` queries.
        key: ``(B, H_kv, n, d_k)`` keys, same dtype; ``H_q`` a multiple of ``H_kv``.
        rows: ``(r,)`` query positions shared by the batch, or ``(B, r)`` per example, in
            ``[0, n_q)``.
        masking: padding, causal, additive and window rules (see :class:`RowMasking`).
        scale: multiplies the scores.

    Returns:
        ``(B, H_q, r, n)`` probabilities in float32 (float64 for float64 inputs); differentiable
        with respect to ``query``, ``key`` and the additive mask.
    """
    return stacked_attention_rows((query,), (key,), rows, masking, scale)


def stacked_attention_rows(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    rows: torch.Tensor,
    masking: RowMasking,
    scale: float,
) -> torch.Tensor:
    """:func:`attention_rows_torch` of several layers that share masking and scale, their heads
    stacked: one masked softmax over all of them instead of one per layer (each layer's scores
    still come from its own product, so no layer's keys are copied).

    Args:
        queries: per layer, ``(B, H_q^l, n_q, d_k)`` queries (same ``B``, ``n_q``, ``d_k`` and
            dtype in every layer).
        keys: per layer, ``(B, H_kv^l, n, d_k)`` keys; ``H_q^l`` a multiple of ``H_kv^l``.
        rows, masking, scale: as in :func:`attention_rows_torch`, for every layer (an additive
            mask with a head axis must match the stacked heads, ``sum_l H_q^l``).

    Returns:
        ``(B, sum_l H_q^l, r, n)``: the rows of layer 0's heads, then layer 1's, and so on.

    Every layer's keys are converted to the working dtype up front: in float32 or float64 that
    is no copy; half-precision keys are copied for all layers at once.
    """
    batch, _, q_len, _ = queries[0].shape
    heads = sum(query.shape[1] for query in queries)
    k_len = keys[0].shape[2]
    work = torch.float64 if queries[0].dtype == torch.float64 else torch.float32
    positions = rows.long().reshape(-1 if rows.dim() == 2 else 1, rows.shape[-1])
    count = positions.shape[-1]
    # (B, H_kv, 1, n, d_k): shared by each group's query heads, which are never repeated.
    stacked_keys = [key.to(work)[:, :, None] for key in keys]
    step = _chunk_rows(batch, heads, k_len, torch.finfo(work).bits // 8)
    every_row = _is_every_row(positions, q_len)

    def layer_scores(
        query: torch.Tensor, key: torch.Tensor, chunk: torch.Tensor, start: int
    ) -> torch.Tensor:
        width, layer_heads, d_k, kv_heads = (
            chunk.shape[-1],
            query.shape[1],
            query.shape[3],
            key.shape[1],
        )
        # Every row in order: a chunk is a slice (a view), not a gathered copy.
        q = query[:, :, start : start + width] if every_row else gather_rows(query, chunk)
        q = q.to(work).view(batch, kv_heads, layer_heads // kv_heads, width, d_k)
        if width == 1 and batch > 1:
            # One row a head (the [CLS] or last row) of several examples: products and a sum. A
            # batched matmul over the (B, H) heads of transformers' (B, S, H, d) keys copies them
            # first when B > 1 (MiniLM, 8 x 128 tokens, one thread: 486 against 142 us a layer),
            # so the products' temporary costs no more memory than that copy; at B = 1 the
            # matmul reads the keys in place (and was the faster: 17 against 22 us).
            return (q * key).sum(-1).view(batch, layer_heads, width, k_len)
        return (q @ key.mT).view(batch, layer_heads, width, k_len)

    def chunk_rows(start: int) -> torch.Tensor:
        chunk = positions[:, start : start + step]
        pairs = zip(queries, stacked_keys, strict=True)
        per_layer = [layer_scores(query, key, chunk, start) for query, key in pairs]
        scores = (per_layer[0] if len(per_layer) == 1 else torch.cat(per_layer, dim=1)) * scale
        if masking.additive is not None:
            scores = scores + gather_rows(masking.additive, chunk).to(work)
        visible = visible_keys(masking, chunk, q_len, k_len)[:, None]
        return _softmax_rows(scores, visible)

    if count <= step:  # one chunk: no output buffer to copy into (nor to differentiate through)
        return chunk_rows(0)
    tracked = any(query.requires_grad for query in queries) or any(k.requires_grad for k in keys)
    if torch.is_grad_enabled() and tracked:
        # Concatenated, not written into a buffer: the backward pass then slices the gradient
        # instead of copying the whole buffer once per chunk.
        return torch.cat([chunk_rows(start) for start in range(0, count, step)], dim=-2)
    out = torch.empty(batch, heads, count, k_len, dtype=work, device=queries[0].device)
    for start in range(0, count, step):
        out[:, :, start : start + step] = chunk_rows(start)
    return out


def _is_every_row(positions: torch.Tensor, q_len: int) -> bool:
    """Whether ``positions`` ``(1, c)`` is ``0, 1, ..., q_len - 1`` (every query row in order)."""
    if positions.shape != (1, q_len):
        return False
    return bool((positions[0] == torch.arange(q_len, device=positions.device)).all())


def attention_rows_of(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    masking: RowMasking,
    scale: float,
    backend: str = "torch",
) -> torch.Tensor:
    """Selected attention rows, by the implementation ``backend`` selects.

    Args and returns as :func:`attention_rows_torch`. ``backend``: ``"torch"`` or ``"auto"``
    (differentiable), ``"triton"``: the Triton kernel (same conventions, no autograd) where it
    takes the problem (no additive mask, no window).

    Raises:
        ValueError: an unknown ``backend``.
        KernelUnavailableError: ``backend="triton"`` where the kernel cannot run or for an
            additive mask or a window, which it does not implement.
    """
    return stacked_attention_rows_of((query,), (key,), rows, masking, scale, backend)


def stacked_attention_rows_of(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    rows: torch.Tensor,
    masking: RowMasking,
    scale: float,
    backend: str = "torch",
) -> torch.Tensor:
    """:func:`stacked_attention_rows` by the implementation ``backend`` selects (as in
    :func:`attention_rows_of`, its one-layer case)."""
    # Imported here: the backend registry imports this module for its PyTorch implementation.
    from captum_effattn.projection.engine.backends import resolve_backend

    chosen = resolve_backend(backend, queries[0].device)
    return chosen.stacked_attention_rows(queries, keys, rows, masking, scale)


def padding_of(
    mask: torch.Tensor, causal: bool, batch: int, key_ranges: KeyRanges | None = None
) -> torch.Tensor | None:
    """The real keys ``(B, S_k)`` of a boolean mask, if the mask is nothing more.

    Args:
        mask: ``(B or 1, 1 or H, S_q, S_k)`` booleans, ``True`` where a query may attend.
        causal: whether the mask is expected to be causal as well (offset as in
            :func:`causal_offset`).
        batch: ``B``.
        key_ranges: the window each query row is expected to see as well (see
            :data:`KeyRanges`), or ``None``.

    Returns:
        A key is real when some query may attend to it. ``None`` when ``mask`` is not exactly the
        padding (and causal) mask of those keys (a sliding window, packed sequences, a custom
        pattern): then padding alone does not describe what each row may see. The comparison
        runs over chunks of query rows, allocating no mask beyond ``mask`` itself.
    """
    q_len, k_len = mask.shape[-2:]
    key_mask = mask.any(-2).any(1).expand(batch, -1)
    masking = RowMasking(key_mask=key_mask, causal=causal, key_ranges=key_ranges)
    full = mask.expand(batch, -1, -1, -1)
    step = _chunk_rows(batch, mask.shape[1], k_len, 1)
    for start in range(0, q_len, step):
        positions = torch.arange(start, min(start + step, q_len), device=mask.device)[None]
        implied = visible_keys(masking, positions, q_len, k_len)[:, None]
        given = full[:, :, start : start + step]
        if not torch.equal(given, implied.expand_as(given)):
            return None
    return key_mask
