"""Input validation for the projections: each bad input gets an error saying what was expected."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captum_effattn._typing import AttentionRows, KeyMask, ValueVectors

# How far a row may stray from a probability distribution and still be accepted (then renormalized
# in float64). Attention computed in low precision sums to 1 only up to its rounding.
DISTRIBUTION_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


@dataclass(frozen=True)
class CheckedInputs:
    """Validated inputs, with the leading (broadcast) shape they share."""

    attn: AttentionRows
    values: ValueVectors
    key_mask: KeyMask
    batch_shape: torch.Size


def _where(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


def _first_index(flags: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in flags.nonzero()[0].tolist())


def _require_float_tensor(name: str, tensor: object, shape_hint: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {shape_hint}; got {type(tensor)!r}"
        )
    if tensor.dim() < 2:
        raise ValueError(
            f"{name} must have shape {shape_hint} (at least 2 dimensions); got shape "
            f"{tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {tensor.dtype}")
    return tensor


def _require_finite(name: str, tensor: torch.Tensor) -> None:
    # A finite sum proves every entry finite in one reduction; only otherwise look closer (a sum
    # of large finite entries can overflow too).
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); the first at "
            "index "
            f"{_where(_first_index(bad))} of shape {tuple(tensor.shape)}"
        )


def check_key_mask(key_mask: object, n: int, other: str, device: torch.device) -> KeyMask:
    """Check a ``(*batch, n)`` key mask of booleans or 0/1 on ``device``; return it as booleans.

    Args:
        key_mask: the user's mask.
        n: the number of keys.
        other: the argument whose device the mask must share, for the message.
        device: that argument's device.
    """
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(
            f"key_mask must be a torch.Tensor of shape (*batch, n); got {type(key_mask)!r}"
        )
    if key_mask.dim() < 1 or key_mask.shape[-1] != n:
        raise ValueError(
            f"key_mask must have shape (*batch, n) with n = {n} keys; got shape "
            f"{tuple(key_mask.shape)}"
        )
    if key_mask.device != device:
        raise ValueError(f"{other} is on {device} but key_mask is on {key_mask.device}")
    if key_mask.dtype != torch.bool:
        if ((key_mask != 0) & (key_mask != 1)).any():
            raise ValueError("key_mask must hold only 0/1 (or booleans): 1 marks a real key")
        key_mask = key_mask != 0
    return key_mask


def check_inputs(
    attn: AttentionRows,
    values: ValueVectors,
    key_mask: KeyMask | None,
    causal: bool,
) -> CheckedInputs:
    """Check shapes, dtypes, devices and finiteness; return inputs with a boolean key mask.

    Raises:
        TypeError: a non-tensor or non-floating-point input.
        ValueError: mismatched shapes, leading dimensions that do not broadcast, non-finite
            values, ``causal=True`` with ``q != n``, or an example whose keys are all masked.
    """
    attn = _require_float_tensor("attn", attn, "(*batch, q, n)")
    values = _require_float_tensor("values", values, "(*batch, n, d)")
    n = attn.shape[-1]
    if values.shape[-2] != n:
        raise ValueError(
            f"values must have shape (*batch, n, d) with n = {n} keys, as attn (shape "
            f"{tuple(attn.shape)}) has; got values of shape {tuple(values.shape)}"
        )
    if values.device != attn.device:
        raise ValueError(f"attn is on {attn.device} but values is on {values.device}")
    if key_mask is None:
        key_mask = torch.ones(n, dtype=torch.bool, device=attn.device)
    else:
        key_mask = check_key_mask(key_mask, n, "attn", attn.device)
    try:
        batch_shape = torch.broadcast_shapes(
            attn.shape[:-2], values.shape[:-2], key_mask.shape[:-1]
        )
    except RuntimeError:
        raise ValueError(
            "leading (batch) dimensions do not broadcast: attn has "
            f"{tuple(attn.shape[:-2])} before (q, n), values has {tuple(values.shape[:-2])} before "
            f"(n, d), key_mask has {tuple(key_mask.shape[:-1])} before (n,)"
        ) from None
    if batch_shape != attn.shape[:-2]:
        raise ValueError(
            f"values and key_mask broadcast to attn's leading dimensions, not the other way: attn "
            f"has {tuple(attn.shape[:-2])} before (q, n), values {tuple(values.shape[:-2])}, "
            f"key_mask {tuple(key_mask.shape[:-1])}. The result is shaped like attn; for one row "
            f"per head pass attn of shape (..., heads, 1, n)"
        )
    if causal and attn.shape[-2] != n:
        raise ValueError(
            f"causal=True needs full square attention (q == n), since row i attends to keys <= i; "
            f"got q = {attn.shape[-2]} rows over n = {n} keys"
        )
    _require_finite("attn", attn)
    _require_finite("values", values)
    empty = ~key_mask.any(-1)
    if empty.any():
        raise ValueError(
            "key_mask masks every key of the example at batch index "
            f"{_where(_first_index(empty))}: "
            "each example needs at least one real key"
        )
    return CheckedInputs(attn, values, key_mask, batch_shape)


def check_distributions(
    rows: torch.Tensor,
    row_mask: torch.Tensor,
    tol: float,
    shape: torch.Size,
    row_index,
) -> None:
    """Check that each row is a probability distribution over its unmasked keys (within ``tol``).

    Args:
        rows: ``(R, n)`` float64 rows, flattened from an ``attn`` tensor of shape ``shape``.
        row_mask: ``(R, n)`` real keys of each row (causal rows included).
        tol: accepted deviation (negative entries, mass on masked keys, sum minus one).
        shape: the shape of the user's ``attn``, for the message.
        row_index: callable mapping a flat row number to its index in ``attn``.
    """
    negative = rows.amin(-1) < -tol
    masked_mass = (rows * ~row_mask).abs().sum(-1)
    off_mask = masked_mass > tol
    total = (rows * row_mask).sum(-1)
    off_sum = (total - 1).abs() > tol
    for flags, what in (
        (negative, lambda i: f"has a negative entry ({float(rows[i].min()):.3g})"),
        (
            off_mask,
            lambda i: f"puts mass {float(masked_mass[i]):.3g} on masked (padding or future) keys",
        ),
        (off_sum, lambda i: f"sums to {float(total[i]):.9g} over its real keys"),
    ):
        if flags.any():
            i = int(flags.nonzero()[0])
            raise ValueError(
                f"attn row at index {_where(row_index(i))} (attn shape {tuple(shape)}) {what(i)}: "
                f"efficient attention needs each row to be a probability distribution over the "
                f"unmasked keys (tolerance {tol:g}; {int(flags.sum())} row(s) fail)"
            )
