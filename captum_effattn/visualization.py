"""Captum text visualization records whose colour scale the special tokens do not take over.

``captum.attr.visualization.visualize_text`` colours each token by its score clipped to
``[-1, 1]``. Attention puts much of its mass on [CLS], [SEP] or ``<s>``, so raw efficient-attention
scores paint those tokens and leave every word nearly white. The records built here scale each
example by the largest absolute score of its ordinary (non-special) tokens, so the strongest word
gets the full colour, and show the special tokens as neutral (0) unless asked to keep them
(then clipped to ``[-1, 1]``: full colour at most, never setting the scale).

Building records needs no IPython (only ``visualize_text``'s rendering does), and works with any
method's ``(S,)`` token scores: efficient attention, Integrated Gradients, Saliency, ...
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any

import torch
from captum.attr import visualization as captum_visualization
from torch import Tensor

SPECIAL_TOKEN_PATTERN = re.compile(r"^(\[[A-Za-z_]+\]|<[^<>\s]+>|<\|[^|]+\|>)$")
"""Tokens treated as special when no list is given: ``[CLS]``, ``[SEP]``, ``[PAD]``, ``<s>``,
``</s>``, ``<pad>``, ``<|endoftext|>`` and the like."""


def special_token_mask(
    tokens: Sequence[str], special_tokens: Collection[str] | None = None
) -> Tensor:
    """``(S,)`` booleans: which tokens are special.

    Args:
        tokens: the ``S`` token strings.
        special_tokens: the special token strings (e.g. ``tokenizer.all_special_tokens``).
            Default: tokens matching :data:`SPECIAL_TOKEN_PATTERN`.
    """
    if special_tokens is None:
        return torch.tensor(
            [bool(SPECIAL_TOKEN_PATTERN.match(t)) for t in tokens], dtype=torch.bool
        )
    special = set(special_tokens)
    return torch.tensor([t in special for t in tokens], dtype=torch.bool)


def scale_scores(
    scores: Tensor,
    tokens: Sequence[str],
    *,
    special_tokens: Collection[str] | None = None,
    show_special: bool = False,
) -> Tensor:
    """Scores divided by the largest ``|score|`` over the non-special tokens.

    Args:
        scores: ``(S,)`` one score per token (any method, any sign).
        tokens: the ``S`` token strings.
        special_tokens: see :func:`special_token_mask`.
        show_special: keep the special tokens' scaled scores, clipped to ``[-1, 1]``; by default
            they are set to 0 (neutral colour).

    Returns:
        ``(S,)`` float scores in ``[-1, 1]``; the strongest ordinary token is at ``±1``. All zeros
        when every ordinary token scores 0.

    Raises:
        ValueError: ``scores`` is not 1-D or its length differs from ``tokens``'.
    """
    scores = torch.as_tensor(scores).detach().cpu()
    if scores.dim() != 1 or scores.shape[0] != len(tokens):
        raise ValueError(
            f"scores must have shape (S,) = ({len(tokens)},) for {len(tokens)} tokens; got "
            f"{tuple(scores.shape)} (sum an attribution's feature axes first: .sum(-1))"
        )
    scores = scores.double()
    special = special_token_mask(tokens, special_tokens)
    ordinary = scores[~special]
    scale = ordinary.abs().max() if len(ordinary) else scores.new_tensor(0.0)
    scaled = scores / scale if scale > 0 else torch.zeros_like(scores)
    scaled = scaled.clamp(-1, 1) if show_special else torch.where(special, 0.0, scaled)
    return scaled.float()


def visualization_record(
    scores: Tensor,
    tokens: Sequence[str],
    *,
    pred_prob: float,
    pred_class: Any,
    true_class: Any,
    attr_class: Any,
    attr_score: float | None = None,
    convergence_delta: float | Tensor | None = None,
    special_tokens: Collection[str] | None = None,
    show_special: bool = False,
) -> captum_visualization.VisualizationDataRecord:
    """One Captum ``VisualizationDataRecord`` with special tokens out of the colour scale.

    Args:
        scores: ``(S,)`` token scores of one example (e.g. ``attributions[0].sum(-1)``).
        tokens: the ``S`` token strings.
        pred_prob, pred_class, true_class, attr_class: shown as in Captum's tutorials.
        attr_score: the "Attribution Score" column. Default: the sum of the raw scores.
        convergence_delta: stored as the record's convergence score (a one-element tensor or a
            number). Default: ``None``.
        special_tokens, show_special: see :func:`scale_scores`.

    Returns:
        The record; ``word_attributions`` holds the scaled ``(S,)`` scores.
    """
    raw = torch.as_tensor(scores).detach().cpu()
    scaled = scale_scores(raw, tokens, special_tokens=special_tokens, show_special=show_special)
    if isinstance(convergence_delta, Tensor):
        convergence_delta = float(convergence_delta.reshape(-1)[0])
    return captum_visualization.VisualizationDataRecord(
        scaled,
        float(pred_prob),
        pred_class,
        true_class,
        attr_class,
        float(raw.sum()) if attr_score is None else float(attr_score),
        list(tokens),
        convergence_delta,
    )


def visualization_records(
    scores: Tensor,
    tokens: Sequence[Sequence[str]],
    *,
    pred_probs: Sequence[float] | Tensor,
    pred_classes: Sequence[Any],
    true_classes: Sequence[Any],
    attr_classes: Sequence[Any],
    convergence_deltas: Sequence[float] | Tensor | None = None,
    special_tokens: Collection[str] | None = None,
    show_special: bool = False,
) -> list[captum_visualization.VisualizationDataRecord]:
    """One record per example of a batch (see :func:`visualization_record`).

    Args:
        scores: ``(B, S)`` token scores, or ``(B, S, *F)`` attributions (summed over ``F``).
        tokens: ``B`` lists of token strings; a shorter list (an example without its padding)
            takes the first scores of its row.
        pred_probs, pred_classes, true_classes, attr_classes: ``B`` values each.
        convergence_deltas: ``(B,)`` or ``None``.
        special_tokens, show_special: see :func:`scale_scores`.

    Raises:
        ValueError: the per-example arguments do not all have ``B`` entries.
    """
    scores = torch.as_tensor(scores).detach()
    if scores.dim() > 2:
        scores = scores.reshape(*scores.shape[:2], -1).sum(-1)
    batch = scores.shape[0]
    columns = {
        "tokens": tokens,
        "pred_probs": pred_probs,
        "pred_classes": pred_classes,
        "true_classes": true_classes,
        "attr_classes": attr_classes,
    }
    if convergence_deltas is not None:
        columns["convergence_deltas"] = convergence_deltas
    wrong = {name: len(value) for name, value in columns.items() if len(value) != batch}
    if wrong:
        raise ValueError(f"scores hold {batch} examples but got {wrong} entries")
    deltas = [None] * batch if convergence_deltas is None else list(convergence_deltas)
    return [
        visualization_record(
            scores[b, : len(tokens[b])],
            tokens[b],
            pred_prob=float(pred_probs[b]),
            pred_class=pred_classes[b],
            true_class=true_classes[b],
            attr_class=attr_classes[b],
            convergence_delta=deltas[b],
            special_tokens=special_tokens,
            show_special=show_special,
        )
        for b in range(batch)
    ]


__all__ = [
    "SPECIAL_TOKEN_PATTERN",
    "scale_scores",
    "special_token_mask",
    "visualization_record",
    "visualization_records",
]
