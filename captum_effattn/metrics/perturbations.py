"""Perturbations of the token gate that mean something for text, for Captum's metrics.

- :func:`token_removal` for ``captum.metrics.infidelity``: each token is removed (its gate set to
  0, i.e. replaced by the baseline token) independently with probability ``drop_probability``.
  The perturbation ``I = g - g_perturbed`` is 1 on the removed tokens, so infidelity compares the
  summed attribution of the removed tokens with the drop of the model's output.
- :func:`gate_noise` for ``captum.metrics.sensitivity_max``: every token is faded toward the
  baseline token by an independent uniform amount in ``[0, radius]`` (``g - radius * U(0, 1)``):
  the input stays on the segment between the baseline and the real text.
- :func:`explanation_function` wraps any Captum attribution (efficient attention included) as
  the ``explanation_func`` that ``sensitivity_max`` re-runs on the perturbed inputs.

Each perturbation draws from its own seeded generator, so a metric is reproducible and every
method can be scored on the same perturbations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from captum_effattn._captum_compat import format_tensor_into_tuples
from captum_effattn.metrics._checks import check_fraction, check_seed

TensorOrTuple = Tensor | tuple[Tensor, ...]


def _format_like(inputs: TensorOrTuple, tensors: tuple[Tensor, ...]) -> TensorOrTuple:
    return tensors if isinstance(inputs, tuple) else tensors[0]


def _uniform(like: Tensor, generator: torch.Generator) -> Tensor:
    draw = torch.rand(like.shape, generator=generator, dtype=torch.float64)
    return draw.to(device=like.device, dtype=like.dtype)


def token_removal(
    drop_probability: float = 0.2, seed: int = 0
) -> Callable[[TensorOrTuple], tuple[TensorOrTuple, TensorOrTuple]]:
    r"""A ``perturb_func`` for ``captum.metrics.infidelity``: Bernoulli token removal.

    Args:
        drop_probability (float): probability that each token is removed, in ``(0, 1]``.
        seed (int): seeds the removal masks (the ``k``-th call draws the same masks for every
            method scored with a function made from the same seed).

    Returns:
        ``perturb(gate) -> (perturbation, perturbed_gate)`` with ``gate`` a ``(N, S)`` tensor (or
        a tuple of them): ``perturbed_gate = gate * keep`` and ``perturbation = gate -
        perturbed_gate``, so infidelity measures ``(I^T attr - (f(g) - f(g - I)))^2``.

    Raises:
        ValueError: ``drop_probability`` not in ``(0, 1]``, or a negative ``seed``.
        TypeError: ``drop_probability`` not a number, or ``seed`` not an int.

    Example::

        >>> infidelity(gate, token_removal(0.2), inputs.gate, attributions,  # doctest: +SKIP
        ...            additional_forward_args=inputs.additional_forward_args,
        ...            target=target, n_perturb_samples=10, normalize=True)
    """
    drop_probability = check_fraction(drop_probability, "drop_probability")
    generator = torch.Generator().manual_seed(check_seed(seed))

    def perturb(inputs: TensorOrTuple) -> tuple[TensorOrTuple, TensorOrTuple]:
        gates = format_tensor_into_tuples(inputs)
        perturbed = tuple(
            gate * (_uniform(gate, generator) >= drop_probability).to(gate.dtype) for gate in gates
        )
        removed = tuple(gate - kept for gate, kept in zip(gates, perturbed, strict=True))
        return _format_like(inputs, removed), _format_like(inputs, perturbed)

    return perturb


def gate_noise(radius: float = 0.1, seed: int = 0) -> Callable[..., TensorOrTuple]:
    r"""A ``perturb_func`` for ``captum.metrics.sensitivity_max``: fade tokens toward the baseline.

    Args:
        radius (float): the largest fade, in ``(0, 1]``: each token's gate ``g_i`` becomes
            ``g_i - radius * u_i`` with ``u_i ~ U(0, 1)`` independent (an L-infinity ball of this
            radius around the input, on the side of the baseline token).
        seed (int): seeds the noise.

    Returns:
        ``perturb(gate, perturb_radius=None) -> perturbed_gate``, shaped like ``gate`` (a tensor or
        a tuple, as ``sensitivity_max`` passes it). ``sensitivity_max`` hands its own
        ``perturb_radius`` (default 0.02) to the function; it is ignored in favour of ``radius``
        here, so pass the radius once, to this factory.

    Raises:
        ValueError: ``radius`` not in ``(0, 1]``, or a negative ``seed``.
        TypeError: ``radius`` not a number, or ``seed`` not an int.
    """
    radius = check_fraction(radius, "the gate-noise radius")
    generator = torch.Generator().manual_seed(check_seed(seed))

    def perturb(inputs: TensorOrTuple, perturb_radius: float | None = None) -> TensorOrTuple:
        del perturb_radius  # the radius is the factory's: sensitivity_max passes its default
        gates = format_tensor_into_tuples(inputs)
        faded = tuple(gate - radius * _uniform(gate, generator) for gate in gates)
        return _format_like(inputs, faded)

    return perturb


def explanation_function(method: Any, **attribute_kwargs: Any) -> Callable[..., TensorOrTuple]:
    r"""A Captum attribution as the ``explanation_func`` of ``sensitivity_max``.

    ``sensitivity_max`` calls ``explanation_func(inputs, **kwargs)`` with ``inputs`` as a tuple
    of tensors and the ``target``, ``additional_forward_args`` and ``baselines`` it expanded per
    perturbation sample in ``kwargs``. The wrapper calls ``method.attribute`` with those and the
    fixed ``attribute_kwargs`` (``n_steps=50``, ``view="efficient"``, ...) and returns the
    attributions detached, in the tuple form of the inputs.

    Args:
        method: a Captum ``Attribution`` (IntegratedGradients, Saliency, InputXGradient,
            FeatureAblation, EfficientAttentionAttribution, ...) or any callable with the
            signature of ``attribute``.
        **attribute_kwargs: fixed keyword arguments of every call.

    Raises:
        ValueError: ``attribute_kwargs`` names an argument ``sensitivity_max`` sets per sample.
    """
    expanded = {"target", "additional_forward_args", "baselines"} & set(attribute_kwargs)
    if expanded:
        raise ValueError(
            f"pass {sorted(expanded)} to sensitivity_max, which expands them per perturbation "
            "sample, not to explanation_function"
        )
    attribute = getattr(method, "attribute", method)

    def explain(inputs: TensorOrTuple, **kwargs: Any) -> TensorOrTuple:
        attributions = attribute(inputs, **attribute_kwargs, **kwargs)
        detached = tuple(a.detach() for a in format_tensor_into_tuples(attributions))
        return _format_like(inputs, detached)

    return explain
