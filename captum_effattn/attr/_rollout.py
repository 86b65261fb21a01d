"""Propagating attention through consecutive layers (pure math: tensors in, tensors out)."""

from __future__ import annotations

import torch


def attention_rollout(matrices: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout through consecutive layers.

    Args:
        matrices: ``(B, L, S, S)`` head-averaged attention of consecutive layers, first layer
            first.
        residual: weight of the identity (the residual stream) mixed into each layer.

    Returns:
        ``(B, S, S)``: ``R = A_L' ... A_1'`` with ``A_l' = (1 - residual) A_l + residual I``;
        row ``i`` says how much each input token flows into position ``i`` at the last layer.
        Distribution rows in give distribution rows out.
    """
    length = matrices.shape[-1]
    identity = torch.eye(length, dtype=matrices.dtype, device=matrices.device)
    flow = identity.expand(matrices.shape[0], length, length)
    for layer in range(matrices.shape[1]):
        flow = ((1 - residual) * matrices[:, layer] + residual * identity) @ flow
    return flow


def relevance_rollout(matrices: torch.Tensor) -> torch.Tensor:
    """Relevance propagation through consecutive layers (Chefer et al., ICCV 2021).

    Args:
        matrices: ``(B, L, S, S)`` non-negative head-averaged relevance of consecutive layers
            (``E_h[(grad A * A)^+]``), first layer first.

    Returns:
        ``(B, S, S)``: ``R`` from ``R = I`` and ``R <- R + A_l R`` for each layer in turn. Rows are
        not normalized: the identity keeps each token's own relevance, and the entries carry the
        scale of the gradients.
    """
    length = matrices.shape[-1]
    identity = torch.eye(length, dtype=matrices.dtype, device=matrices.device)
    relevance = identity.expand(matrices.shape[0], length, length)
    for layer in range(matrices.shape[1]):
        relevance = relevance + matrices[:, layer] @ relevance
    return relevance
