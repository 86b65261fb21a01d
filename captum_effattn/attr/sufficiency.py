"""Check the central claim on a real model: substituted attention reproduces the model's output.

Efficient (and effective) attention rows give every head exactly the output its raw attention
gives, so running the model with every selected head's attention replaced by them must leave the
logits unchanged, up to solver tolerance and the model's own rounding. A replacement that changes
head outputs (e.g. raw rows mixed with uniform) must change the logits: the check can fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_effattn._captum_compat import (
    TargetType,
    format_additional_forward_args,
    format_tensor_into_tuples,
)
from captum_effattn.attr._targets import as_output_tensor, validate_target
from captum_effattn.attr._views import View, get_view, project_captured
from captum_effattn.models import CapturedHeads, capture_attention, select_heads
from captum_effattn.models.selection import HeadSpec, IndexSpec

Replacement = Callable[[Tensor, Tensor, Tensor, bool], Tensor]
"""``(attn (B, H, S, S), values (B, H, S, d), key_mask (B, S), causal) -> rows (B, H, S, S)``."""


@dataclass(frozen=True)
class SufficiencyReport:
    """How much the model's output moved when the selected heads' attention was substituted.

    Attributes:
        view: the substituted view (or the replacement's name).
        relative_change: ``(B,)`` ``||f_sub(x) - f(x)|| / ||f(x)||`` per example, over all output
            elements of the example.
        head_output_error: ``(B,)`` largest relative head-output error of the substituted rows
            (0 for a custom replacement).
    """

    view: str
    relative_change: Tensor
    head_output_error: Tensor

    @property
    def max_relative_change(self) -> float:
        return float(self.relative_change.max())

    def holds(self, tol: float = 1e-5) -> bool:
        """Whether every example's output moved by at most ``tol`` (relative)."""
        return self.max_relative_change <= tol


def check_sufficiency(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    additional_forward_args: Any = None,
    forward_func: Callable | None = None,
    layers: IndexSpec = None,
    heads: HeadSpec = None,
    view: str | Replacement = "efficient",
    target: TargetType = None,
) -> SufficiencyReport:
    """Run the model plainly and with every selected head's attention substituted; compare.

    Args:
        model: a supported Hugging Face transformer in evaluation mode.
        inputs: ``forward_func``'s inputs (a tensor or a tuple), as for Captum methods.
        additional_forward_args: extra arguments appended to ``inputs``.
        forward_func: what to run (default: ``model``); its output may be a tensor, a model
            output with ``.logits``, or a tuple starting with a tensor.
        layers, heads: the heads to substitute (default: all), as in
            :meth:`EfficientAttentionAttribution.attribute`.
        view: ``"efficient"``, ``"effective"``, ``"raw"``, or a :data:`Replacement` callable
            producing rows to substitute (e.g. a perturbed distribution, as a negative control).
        target: accepted so the check takes the arguments of an attribution call; validated
            against the output (an impossible index raises), then unused: every output element
            is compared.

    Returns:
        A :class:`SufficiencyReport`; ``report.holds(1e-5)`` is the claim for float32 models.

    Raises:
        RuntimeError: a selected layer's attention did not run through the capture, so it was
            not substituted (the message names the selected layers): ``forward_func`` did not
            run ``model``, or the model's attention does not dispatch through transformers'
            ``AttentionInterface``; or a forward pass skipped some selected layers.
    """
    forward_func = model if forward_func is None else forward_func
    selection = select_heads(model, layers, heads)
    args = (
        *format_tensor_into_tuples(inputs),
        *format_additional_forward_args(additional_forward_args),
    )
    errors: list[Tensor] = []
    if callable(view) and not isinstance(view, str):
        name, replacement = getattr(view, "__name__", "custom"), view

        def transform(captured: CapturedHeads) -> Tensor:
            return replacement(captured.attn, captured.values, captured.key_mask, captured.causal)

    else:
        chosen: View = get_view(view)
        name = chosen.name

        def transform(captured: CapturedHeads) -> Tensor:
            rows, error = project_captured(captured, chosen)
            errors.append(error.reshape(error.shape[0], -1).amax(-1))
            return rows

    with torch.no_grad():
        plain = as_output_tensor(forward_func(*args))
        validate_target(target, plain)
        with capture_attention(model, selection, transform) as record:
            substituted = as_output_tensor(forward_func(*args))
    record.check_captured()  # a layer that was not captured was not substituted either
    batch = plain.shape[0]
    change = (substituted - plain).reshape(batch, -1).double().norm(dim=-1)
    scale = (
        plain.reshape(batch, -1).double().norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    )
    head_error = (
        torch.stack(errors).amax(0)
        if errors
        else torch.zeros(batch, dtype=torch.float64, device=plain.device)
    )
    return SufficiencyReport(
        view=name, relative_change=change / scale, head_output_error=head_error
    )
