"""Captum's ``target`` argument, checked against the output it indexes.

Captum methods pick the explained output with ``target``: an int (the same class for every
example), a tuple (an index into the non-batch axes), a tensor of one or ``B`` class indices, or a
list of ``B`` ints or tuples. Attention alone ignores the target, but a wrong one is still a bug in
the caller's code: it is validated against the forward output every time, so that it fails the
same way whichever options are chosen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.utils import ModelOutput

from captum_effattn._captum_compat import TargetType


def as_output_tensor(output: Any) -> Tensor:
    """The tensor of a forward output: the tensor itself, a model output's ``.logits`` (else its
    first field), or the first element of a tuple.

    Raises:
        TypeError: none of those.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, ModelOutput):
        output = output.to_tuple()
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"forward_func must return a tensor, a model output with .logits, or a tuple starting "
        f"with a tensor; got {type(output).__name__}"
    )


def _check_index(index: Any, output: Tensor, where: str) -> None:
    """One example's target: an int class, or a tuple indexing the non-batch axes."""
    indices = index if isinstance(index, tuple) else (index,)
    axes = tuple(output.shape[1:])
    if len(indices) > len(axes):
        raise ValueError(
            f"target {where}{index!r} indexes {len(indices)} axes, but the output of shape "
            f"{tuple(output.shape)} has {len(axes)} beyond the batch"
        )
    for value, size in zip(indices, axes, strict=False):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"target {where}{index!r} must hold integer indices; got {type(value).__name__}"
            )
        if not 0 <= value < size:
            raise ValueError(
                f"target {where}{index!r} is out of range: the output has {size} classes "
                f"(valid targets 0..{size - 1})"
            )


def _per_example(target: Tensor | list, batch: int) -> list:
    """The list of ``batch`` per-example targets of a tensor or list target."""
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(
                f"target must hold integer class indices; got a tensor of dtype {target.dtype}"
            )
        if target.numel() not in (1, batch) or target.dim() > 1:
            raise ValueError(
                f"a target tensor holds one class index or one per example ({batch}); got shape "
                f"{tuple(target.shape)}"
            )
        return target.reshape(-1).expand(batch).tolist()
    if len(target) != batch:
        raise ValueError(f"a target list holds one target per example ({batch}); got {len(target)}")
    return list(target)


def validate_target(target: TargetType, output: Tensor) -> None:
    """Check ``target`` against the forward ``output`` it indexes (Captum's forms).

    Args:
        target: ``None``, an int, a tuple, an integer tensor of 1 or ``B`` elements, or a list of
            ``B`` ints or tuples.
        output: ``(B, ...)`` the forward function's output.

    Raises:
        ValueError: an index out of range (the message names the number of classes), a float or
            bool target, a tensor or list whose length is neither 1 nor ``B``, a tuple longer
            than the output's non-batch axes. A ``(B,)`` output (one score per example, as in
            Captum's BERT tutorial) has nothing to index: any target passes.
    """
    if target is None or output.dim() < 2:
        return  # a (B,) output has nothing to index: the target cannot select anything in it
    if isinstance(target, Tensor | list):
        for number, index in enumerate(_per_example(target, output.shape[0])):
            _check_index(index, output, f"of example {number}: ")
        return
    _check_index(target, output, "")


def class_indices(target: TargetType, output: Tensor, what: str) -> Tensor:
    """``(B,)`` class indices into a ``(B, C)`` output: the examples' explained logits.

    Args:
        target: as in :func:`validate_target`; ``None`` only when ``C == 1``.
        output: the forward output.
        what: who needs the class (for the messages).

    Raises:
        ValueError: ``output`` is not ``(B, C)``; no target for several classes; an invalid
            target (:func:`validate_target`).
    """
    if output.dim() != 2:
        raise ValueError(
            f"{what} needs a forward output with one row of class scores per example, (B, C); "
            f"got shape {tuple(output.shape)}. Wrap forward_func to return (B, C) scores (e.g. "
            "the logits of the last real token of a language model)."
        )
    validate_target(target, output)
    batch, classes = output.shape
    if target is None:
        if classes != 1:
            raise ValueError(f"{what} needs a target: the output has {classes} classes")
        target = 0
    if isinstance(target, Tensor | list):
        per_example = _per_example(target, batch)
    else:
        per_example = [target] * batch
    if any(isinstance(index, tuple) and len(index) != 1 for index in per_example):
        raise ValueError(f"{what} needs one class index per example; got target {target!r}")
    flat = [index[0] if isinstance(index, tuple) else index for index in per_example]
    return torch.tensor(flat, dtype=torch.long, device=output.device)
