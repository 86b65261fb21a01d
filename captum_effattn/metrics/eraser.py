"""Faithfulness by erasure: ERASER comprehensiveness and sufficiency, deletion and insertion.

Pure functions of a forward function in token-gate space (:mod:`captum_effattn.metrics.token_gate`):
removing a token sets its gate to 0 (it becomes the baseline token); special tokens and padding are
never removed (``removable``). Tokens are ranked by attribution, highest first; ties go to the
earlier position.

- comprehensiveness (DeYoung et al., ACL 2020): ``p(y|x) - p(y|x without its top-k tokens)``;
  higher is better (the top tokens were needed).
- sufficiency: ``p(y|x) - p(y|only its top-k tokens)``; lower is better (they were enough).
- AOPC: each of the above averaged over bins of ``k`` as fractions of the removable tokens, ERASER's
  ``{1, 5, 10, 20, 50}%`` by default. ``k = ceil(fraction * n)``, at least one token. Numbers
  computed with different bins are not comparable.
- deletion / insertion curves: ``p(y|.)`` as the top tokens are removed from the text (deletion)
  or put back into an empty text (insertion), at ``steps + 1`` evenly spaced fractions; the area
  under each curve (trapezoid rule over ``[0, 1]``): lower is better for deletion, higher for
  insertion.

``p(y|.)`` is the softmax probability of the target class, or the sigmoid of a single logit.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from captum_effattn.metrics._checks import check_positive_int

ERASER_BINS: tuple[float, ...] = (0.01, 0.05, 0.10, 0.20, 0.50)
"""ERASER's AOPC bins, as fractions of the removable tokens."""

TokenScores = Annotated[Tensor, "(B, S)"]
Targets = Annotated[Tensor, "(B,)"]
Curve = Annotated[Tensor, "(B, K)"]

# Fractions times counts can land a hair above an integer (0.1 * 30 = 3.0000000000000004).
_ROUNDING_SLACK = 1e-9


def target_probability(logits: Tensor, target: Tensor | None) -> Tensor:
    """``(N,)`` probability of each example's target class.

    Args:
        logits: ``(N, C)`` (softmax over classes) or ``(N,)`` / ``(N, 1)`` (sigmoid).
        target: ``(N,)`` class indices; may be ``None`` only for a single-logit output.

    Raises:
        ValueError: ``target`` is missing for a multi-class output, or out of range.
    """
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return torch.sigmoid(logits.reshape(-1).double())
    classes = logits.shape[-1]
    if target is None:
        raise ValueError(
            f"the model returns {classes} classes per example: pass target (the class to explain "
            "for each example, e.g. the predicted one)"
        )
    check_target_range(target, classes)
    probabilities = logits.double().softmax(-1)
    return probabilities.gather(-1, target.reshape(-1, 1).to(logits.device))[:, 0]


def check_target_range(target: Tensor, classes: int, what: str = "target") -> None:
    """Raise a ValueError unless every entry of ``target`` is a class in ``[0, classes)``."""
    if target.numel() and not (int(target.min()) >= 0 and int(target.max()) < classes):
        raise ValueError(f"{what} {target.tolist()} out of range for {classes} classes")


def top_token_counts(removable: Tensor, fractions: Sequence[float], at_least_one: bool) -> Tensor:
    """``(K, B)`` how many top tokens each fraction names: ``ceil(fraction * n_removable)``."""
    available = removable.sum(-1).double()
    shares = torch.tensor(list(fractions), dtype=torch.float64, device=removable.device)
    counts = torch.ceil(shares[:, None] * available[None] - _ROUNDING_SLACK).clamp_min(0)
    if at_least_one:
        counts = torch.maximum(counts, torch.ones_like(counts))
    return torch.minimum(counts, available[None]).long()


def top_token_masks(attributions: TokenScores, removable: Tensor, counts: Tensor) -> Tensor:
    """``(K, B, S)`` bool: each example's ``counts[k, b]`` highest-scored removable tokens."""
    if attributions.shape != removable.shape:
        raise ValueError(
            f"attributions have shape {tuple(attributions.shape)}; expected (B, S) = "
            f"{tuple(removable.shape)}, one score per token"
        )
    scores = attributions.detach().double().masked_fill(~removable, -torch.inf)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank.scatter_(-1, order, positions)
    return (rank[None] < counts[..., None]) & removable[None]


def probabilities_of_gates(
    forward_func: Callable[..., Tensor],
    gates: Tensor,
    target: Tensor | None,
    additional_forward_args: tuple[Any, ...] = (),
    max_examples_per_batch: int = 64,
) -> Curve:
    """``(B, K)`` target probability of ``K`` gated versions ``(K, B, S)`` of each example.

    Runs ``forward_func(gate, *additional_forward_args)`` on chunks of at most
    ``max_examples_per_batch`` gated examples, without gradients.
    """
    max_examples_per_batch = check_positive_int(max_examples_per_batch, "max_examples_per_batch")
    versions, batch = gates.shape[:2]
    flat = gates.reshape(versions * batch, *gates.shape[2:])
    repeat = [a.repeat(versions, *([1] * (a.dim() - 1))) for a in additional_forward_args]
    targets = None if target is None else target.repeat(versions)
    chunks = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], max_examples_per_batch):
            part = slice(start, start + max_examples_per_batch)
            logits = forward_func(flat[part], *(a[part] for a in repeat))
            chunks.append(target_probability(logits, None if targets is None else targets[part]))
    return torch.cat(chunks).reshape(versions, batch).T


def _erase(
    gate: Tensor, attributions: TokenScores, removable: Tensor, counts: Tensor, keep_top: bool
) -> Tensor:
    """``(K, B, S)`` gates: the top ``counts[k, b]`` tokens removed, or (keep_top) kept alone."""
    top = top_token_masks(attributions, removable, counts)
    erase = (removable[None] & ~top) if keep_top else top
    return gate[None] * (~erase).to(gate.dtype)


def check_token_batch(
    gate: Tensor, attributions: TokenScores, removable: Tensor, target: Tensor | None
) -> Tensor:
    """``removable`` as bool after checking that the batch is one ``(B, S)`` shape throughout.

    Raises:
        ValueError: ``gate`` is not a non-empty float ``(B, S)``, ``attributions`` or
            ``removable`` differ from its shape, or ``target`` is not ``B`` class indices.
    """
    if gate.dim() != 2 or gate.numel() == 0 or not gate.is_floating_point():
        raise ValueError(
            f"gate must be a non-empty float (B, S) tensor; got {gate.dtype} of shape "
            f"{tuple(gate.shape)}"
        )
    for name, tensor in (("attributions", attributions), ("removable", removable)):
        if tuple(tensor.shape) != tuple(gate.shape):
            raise ValueError(
                f"{name} have shape {tuple(tensor.shape)}; expected (B, S) = {tuple(gate.shape)}, "
                "one entry per token"
            )
    if target is not None and target.numel() != gate.shape[0]:
        raise ValueError(
            f"target has {target.numel()} entries; expected one class per example ({gate.shape[0]})"
        )
    return removable.bool()


def check_fractions(fractions: Sequence[float], what: str) -> tuple[float, ...]:
    """``fractions`` as a tuple of floats in ``(0, 1]``, else a ValueError (a TypeError for
    non-numbers) naming ``what``."""
    if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__iter__"):
        raise TypeError(f"{what} must be a sequence of fractions in (0, 1]; got {fractions!r}")
    fractions = tuple(fractions)
    if any(isinstance(f, bool) or not isinstance(f, numbers.Real) for f in fractions):
        raise TypeError(f"{what} must be fractions in (0, 1] (0.01 = 1%); got {fractions}")
    fractions = tuple(float(f) for f in fractions)
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"{what} must be fractions in (0, 1] (0.01 = 1%); got {fractions}")
    return fractions


def erasure_curve(
    forward_func: Callable[..., Tensor],
    gate: Tensor,
    attributions: TokenScores,
    removable: Tensor,
    target: Tensor | None,
    additional_forward_args: tuple[Any, ...] = (),
    bins: Sequence[float] = ERASER_BINS,
    keep_top: bool = False,
    max_examples_per_batch: int = 64,
) -> Curve:
    """``(B, K)`` probability drop ``p(y|x) - p(y|x')`` for each bin.

    ``x'`` removes each example's top ``k`` tokens (``keep_top=False``: comprehensiveness), or
    keeps only them (``keep_top=True``: sufficiency).

    Raises:
        ValueError: ``bins`` not fractions in ``(0, 1]``, inputs of different ``(B, S)`` shapes,
            a target out of the model's classes.
    """
    bins = check_fractions(bins, "bins")
    removable = check_token_batch(gate, attributions, removable, target)
    counts = top_token_counts(removable, bins, at_least_one=True)
    erased = _erase(gate, attributions, removable, counts, keep_top)
    versions = torch.cat([gate[None], erased])
    probabilities = probabilities_of_gates(
        forward_func, versions, target, tuple(additional_forward_args), max_examples_per_batch
    )
    return probabilities[:, :1] - probabilities[:, 1:]


def perturbation_curve(
    forward_func: Callable[..., Tensor],
    gate: Tensor,
    attributions: TokenScores,
    removable: Tensor,
    target: Tensor | None,
    additional_forward_args: tuple[Any, ...] = (),
    steps: int = 10,
    insertion: bool = False,
    max_examples_per_batch: int = 64,
) -> tuple[Tensor, Curve]:
    """Deletion (or insertion) curve: ``(fractions (K,), probabilities (B, K))``, ``K = steps+1``.

    Deletion removes the top ``ceil(f * n)`` tokens; insertion starts from the text with every
    removable token removed and puts the top ``ceil(f * n)`` back.

    Raises:
        ValueError: ``steps`` below 1, inputs of different ``(B, S)`` shapes, a target out of
            the model's classes.
        TypeError: ``steps`` not an int.
    """
    steps = check_positive_int(steps, "steps")
    removable = check_token_batch(gate, attributions, removable, target)
    fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    counts = top_token_counts(removable, fractions.tolist(), at_least_one=False)
    versions = _erase(gate, attributions, removable, counts, keep_top=insertion)
    probabilities = probabilities_of_gates(
        forward_func, versions, target, tuple(additional_forward_args), max_examples_per_batch
    )
    return fractions, probabilities


def area_under_curve(fractions: Tensor, curve: Curve) -> Tensor:
    """``(B,)`` trapezoid-rule area of ``curve`` over ``fractions``."""
    return torch.trapezoid(curve, fractions.to(curve), dim=-1)
