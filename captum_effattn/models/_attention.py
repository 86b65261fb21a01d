"""Explicit attention, the way eager attention computes it, and the masks it reads.

Pure tensor functions (no model code) used by :mod:`captum_effattn.models.capture`. Shapes: ``B``
batch, ``H`` query heads, ``H_kv`` key/value heads, ``S_q`` queries, ``S_k`` keys, ``d`` head width.
"""

from __future__ import annotations

import torch


def allowed_keys(
    mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor:
    """The mask as booleans ``(B or 1, 1 or H, S_q, S_k)``, True where a query may attend."""
    if mask is None:
        return padding_and_causal(
            torch.ones(1, k_len, dtype=torch.bool, device=device), causal, q_len
        )
    if mask.dtype == torch.bool:
        return mask
    # An additive float mask (a user's own 4D mask): hidden keys carry (about) the dtype's minimum.
    return mask > torch.finfo(mask.dtype).min / 2


def padding_and_causal(key_mask: torch.Tensor, causal: bool, q_len: int) -> torch.Tensor:
    """``(B, 1, S_q, S_k)``: real keys, and for causal attention only keys up to each query."""
    k_len = key_mask.shape[-1]
    allowed = key_mask[:, None, None, :]
    if causal:
        seen = torch.ones(q_len, k_len, dtype=torch.bool, device=key_mask.device)
        allowed = allowed & seen.tril(k_len - q_len)
    return allowed


def real_keys(allowed: torch.Tensor, causal: bool, batch: int, q_len: int) -> torch.Tensor | None:
    """The real (non-padding) keys ``(B, S_k)`` of a mask, if the mask is nothing more.

    Args:
        allowed: boolean mask ``(B or 1, 1 or H, S_q, S_k)`` (see :func:`allowed_keys`).
        causal: whether the mask is expected to be causal as well.
        batch: ``B``.
        q_len: ``S_q``.

    Returns:
        A key is real when some query may attend to it. ``None`` when ``allowed`` is not exactly
        :func:`padding_and_causal` of those keys (a sliding window, packed sequences, a custom
        pattern): then padding alone does not describe what each row may see.
    """
    key_mask = allowed.any(-2).any(1).expand(batch, -1)
    shape = (batch, allowed.shape[1], q_len, key_mask.shape[-1])
    implied = padding_and_causal(key_mask, causal, q_len)
    return key_mask if torch.equal(allowed.expand(shape), implied.expand(shape)) else None


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor,
    additive_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """``softmax(Q K^T * scaling + mask)`` with hidden keys at exactly 0.

    Args:
        query: ``(B, H, S_q, d)``.
        key: ``(B, H, S_k, d)`` (key/value heads already repeated for grouped-query attention).
        allowed: boolean mask broadcastable to ``(B, H, S_q, S_k)``.
        additive_mask: a float mask added to the scores before masking (a user's 4D mask), or
            ``None``.
        scaling: score scale (``d ** -0.5`` in most models).

    Returns:
        ``(B, H, S_q, S_k)`` probabilities in ``query``'s dtype; rows without any allowed key are
        all zero.
    """
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.float()
    if additive_mask is not None:
        scores = scores + additive_mask.float()
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = scores.softmax(-1) * allowed.any(-1, keepdim=True)
    return probs.to(query.dtype)


def repeat_kv(states: torch.Tensor, group: int) -> torch.Tensor:
    """``(B, H_kv, S, d) -> (B, H_kv * group, S, d)``: each key/value head once per query head."""
    return states if group == 1 else states.repeat_interleave(group, dim=1)
