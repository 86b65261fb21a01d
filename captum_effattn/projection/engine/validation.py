"""Validation of every tensor entering the projections and the kernels.

Each check is a small function with its own message: which argument, the shape (or dtype, or
device) expected, and what was got. Three entry points use them:

- :func:`check_inputs`: attention rows and values entering the projections.
- :func:`check_qk_inputs`: queries, keys and values entering the ``*_from_qk`` functions.
- :func:`check_kernel_operands`: operands entering a Triton kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from captum_effattn._typing import AttentionRows, KeyMask, ValueVectors
from captum_effattn.kernels._support import check_device
from captum_effattn.projection.engine.certify import distribution_terms

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


def where(index: tuple[int, ...]) -> str:
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
            f"{where(_first_index(bad))} of shape {tuple(tensor.shape)}"
        )


def _require_nonempty_axes(attn: torch.Tensor, values: torch.Tensor) -> None:
    """At least one key and one value feature (empty batches and row sets are fine)."""
    if attn.shape[-1] == 0:
        raise ValueError(
            f"attn and values must have at least one key (n >= 1); got attn of shape "
            f"{tuple(attn.shape)} and values of shape {tuple(values.shape)}"
        )
    if values.shape[-1] == 0:
        raise ValueError(
            f"values must have at least one feature (d >= 1) in shape (*batch, n, d): a head with "
            f"values of width 0 has no output to preserve; got values of shape "
            f"{tuple(values.shape)}"
        )


def check_masked_mass(
    rows: torch.Tensor,
    row_mask: torch.Tensor,
    tol: float,
    shape: torch.Size,
    row_index: Callable[[int], tuple[int, ...]],
) -> None:
    """Raise ``ValueError`` if a row puts weight on keys it may not use (padding, future).

    Args:
        rows: ``(R, n)`` float64 rows, flattened from an ``attn`` tensor of shape ``shape``.
        row_mask: ``(R, n)`` the keys each row may use.
        tol: accepted weight on the other keys, relative to the row's total absolute weight
            (at least 1).
        shape: the shape of the user's ``attn``, for the message.
        row_index: maps a flat row number to its index in ``attn``.
    """
    masked = (rows * ~row_mask).abs().sum(-1)
    off = masked > tol * rows.abs().sum(-1).clamp_min(1)
    if off.any():
        i = int(off.nonzero()[0])
        raise ValueError(
            f"attn row at index {where(row_index(i))} (attn shape {tuple(shape)}) puts mass "
            f"{float(masked[i]):.3g} on masked (padding or future) keys: those keys are not part "
            f"of the example, and the projection would silently drop that mass "
            f"({int(off.sum())} row(s) fail)"
        )


def _require_number(name: str, value: object, low: float, high: float, closed: str) -> float:
    """``value`` as a float in ``[low, high]`` (``closed`` says which ends are included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    inside_low = value >= low if closed in ("both", "low") else value > low
    inside_high = value <= high if closed in ("both", "high") else value < high
    if not (inside_low and inside_high and math.isfinite(value)):
        left = "[" if closed in ("both", "low") else "("
        right = "]" if closed in ("both", "high") else ")"
        raise ValueError(f"{name} must be in {left}{low:g}, {high:g}{right}; got {value!r}")
    return float(value)


def _require_count(name: str, value: object, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0 ({meaning}); got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0 ({meaning}); got {value}")
    return value


def check_solver_options(
    tol: object,
    rank_rtol: object | None = None,
    distribution_tol: object | None = None,
    max_newton_iter: object | None = None,
    max_interior_iter: object | None = None,
) -> None:
    """Check the numeric options of the projections; each message names the option.

    Raises:
        TypeError: an option of the wrong type (a count that is not an int, a tolerance that is
            not a number).
        ValueError: ``tol`` not in ``(0, inf)``, ``rank_rtol`` not in ``[0, 1)``,
            ``distribution_tol`` not in ``(0, 1)``, or a negative iteration count.
    """
    if isinstance(tol, bool) or not isinstance(tol, int | float):
        raise TypeError(f"tol must be a real number; got {tol!r}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be positive and finite; got {tol!r}")
    if rank_rtol is not None:
        _require_number("rank_rtol", rank_rtol, 0, 1, "low")
    if distribution_tol is not None:
        _require_number("distribution_tol", distribution_tol, 0, 1, "none")
    if max_newton_iter is not None:
        _require_count("max_newton_iter", max_newton_iter, "0 goes to the interior point at once")
    if max_interior_iter is not None:
        _require_count("max_interior_iter", max_interior_iter, "0 keeps Newton's rows")


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
    _require_nonempty_axes(attn, values)
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
            f"{where(_first_index(empty))}: "
            "each example needs at least one real key"
        )
    return CheckedInputs(attn, values, key_mask, batch_shape)


def check_distributions(
    rows: torch.Tensor,
    row_mask: torch.Tensor,
    tol: float,
    shape: torch.Size,
    row_index: Callable[[int], tuple[int, ...]],
) -> None:
    """Check that each row is a probability distribution over its unmasked keys (within ``tol``).

    Args:
        rows: ``(R, n)`` float64 rows, flattened from an ``attn`` tensor of shape ``shape``.
        row_mask: ``(R, n)`` real keys of each row (causal rows included).
        tol: accepted deviation (negative entries, mass on masked keys, sum minus one).
        shape: the shape of the user's ``attn``, for the message.
        row_index: callable mapping a flat row number to its index in ``attn``.
    """
    smallest, masked_mass, total = distribution_terms(rows, row_mask).unbind(-1)
    negative = smallest < -tol
    off_mask = masked_mass > tol
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
                f"attn row at index {where(row_index(i))} (attn shape {tuple(shape)}) {what(i)}: "
                f"efficient attention needs each row to be a probability distribution over the "
                f"unmasked keys (tolerance {tol:g}; {int(flags.sum())} row(s) fail)"
            )


# --- queries and keys (the ``*_from_qk`` functions) ---------------------------------------------

QUERY_SHAPE = "(*batch, H_q, n_q, d_k)"
KEY_SHAPE = "(*batch, H_kv, n, d_k)"
VALUES_SHAPE = "(*batch, H_kv, n, d_v)"

QueryRows = int | Sequence[int] | torch.Tensor | None
"""Query positions: an int, a sequence of ints, a 1-D integer tensor, or ``None`` for all."""


@dataclass(frozen=True)
class QKProblem:
    """Validated inputs with the leading dimensions flattened to one batch dimension ``B``."""

    query: torch.Tensor  # (B, H_q, n_q, d_k)
    key: torch.Tensor  # (B, H_kv, n, d_k)
    values: torch.Tensor | None  # (B, H_kv, n, d_v)
    key_mask: KeyMask | None  # (B, n) bool, None when every key is real
    rows: torch.Tensor  # (r,) int64 query positions in [0, n_q)
    scale: float
    batch_shape: torch.Size

    def unflatten(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, ...)`` back to ``(*batch, ...)``."""
        return tensor.reshape(*self.batch_shape, *tensor.shape[1:])


def _heads_tensor(name: str, tensor: object, shape_hint: str) -> torch.Tensor:
    checked = _require_float_tensor(name, tensor, shape_hint)
    if checked.dim() < 3:
        raise ValueError(
            f"{name} must have shape {shape_hint} (at least 3 dimensions); got shape "
            f"{tuple(checked.shape)}"
        )
    return checked


def _check_key_fits_query(query: torch.Tensor, key: torch.Tensor) -> None:
    """Same head width, dtype and device; query heads a multiple of key heads."""
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"key must have shape {KEY_SHAPE} with d_k = {query.shape[-1]} as query (shape "
            f"{tuple(query.shape)}) has; got key of shape {tuple(key.shape)}"
        )
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if heads == 0 or kv_heads == 0:
        raise ValueError(
            f"query and key must have at least one head; got query of shape "
            f"{tuple(query.shape)} ({QUERY_SHAPE}) and key of shape {tuple(key.shape)}"
        )
    if heads % kv_heads:
        raise ValueError(
            f"query has {heads} heads and key {kv_heads}: grouped-query attention needs the "
            "query heads to be a multiple of the key heads"
        )
    if key.dtype != query.dtype:
        raise TypeError(f"query and key must share one dtype; got {query.dtype} and {key.dtype}")
    if key.device != query.device:
        raise ValueError(f"query is on {query.device} but key is on {key.device}")


def _check_values_fit_key(values: object, key: torch.Tensor) -> torch.Tensor:
    checked = _heads_tensor("values", values, VALUES_SHAPE)
    kv_heads, n = key.shape[-3:-1]
    if checked.shape[-3:-1] != (kv_heads, n):
        raise ValueError(
            f"values must have shape {VALUES_SHAPE} with H_kv = {kv_heads} heads and n = {n} "
            f"keys, as key (shape {tuple(key.shape)}) has; got values of shape "
            f"{tuple(checked.shape)}"
        )
    if checked.shape[-1] == 0:
        raise ValueError(
            f"values must have at least one feature (d_v >= 1) in shape {VALUES_SHAPE}: a head "
            f"with values of width 0 has no output to preserve; got values of shape "
            f"{tuple(checked.shape)}"
        )
    if checked.device != key.device:
        raise ValueError(f"query is on {key.device} but values is on {checked.device}")
    return checked


def _broadcast_batch(named_shapes: dict[str, torch.Size]) -> torch.Size:
    try:
        return torch.broadcast_shapes(*named_shapes.values())
    except RuntimeError:
        listed = ", ".join(f"{name} has {tuple(shape)}" for name, shape in named_shapes.items())
        raise ValueError(f"leading (batch) dimensions do not broadcast: {listed}") from None


def _check_causal_square(causal: bool, n_q: int, n: int) -> None:
    if causal and n_q != n:
        raise ValueError(
            f"causal=True needs one query per key (n_q == n), since query i attends to keys <= i; "
            f"got n_q = {n_q} queries over n = {n} keys"
        )


def _score_scale(scaling: float | None, d_k: int) -> float:
    scale = 1 / math.sqrt(d_k) if scaling is None else float(scaling)
    if not math.isfinite(scale):
        raise ValueError(f"scaling must be a finite number; got {scaling!r}")
    return scale


def _query_rows(rows: QueryRows, n_q: int, device: torch.device) -> torch.Tensor:
    if rows is None:
        return torch.arange(n_q, device=device)
    index = torch.as_tensor(rows, device=device)
    if index.dim() == 1 and index.numel() == 0:
        return index.long()  # no rows requested: an empty result
    if index.dim() == 0:
        index = index[None]
    if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(
            f"rows must be an int, a sequence of ints or a 1-D integer tensor of query positions; "
            f"got {rows!r}"
        )
    outside = (index < -n_q) | (index >= n_q)
    if outside.any():
        raise ValueError(
            f"rows must be query positions in [-{n_q}, {n_q}) (n_q = {n_q} queries); got "
            f"{int(index[outside][0])}"
        )
    return index.long() % n_q


def _require_visible_keys(
    key_mask: torch.Tensor, rows: torch.Tensor, causal: bool, batch_shape: torch.Size
) -> None:
    """Every requested row must see a real key (a causal row sees keys up to its position)."""
    n = key_mask.shape[-1]
    first_real = torch.where(key_mask.any(-1), key_mask.int().argmax(-1), n)
    last_visible = rows if causal else torch.full_like(rows, n - 1)
    blind = first_real[:, None] > last_visible[None, :]
    if blind.any():
        example, slot = (int(i) for i in blind.nonzero()[0])
        index = torch.unravel_index(torch.tensor(example), batch_shape)
        position = int(rows[slot])
        seen = f"keys 0..{position} are" if causal else "every key is"
        raise ValueError(
            f"query row {position} of the example at batch index "
            f"{where(tuple(int(i) for i in index))} sees no real key ({seen} masked): its "
            "attention is undefined"
        )


def check_qk_inputs(
    query: object,
    key: object,
    values: object | None,
    key_mask: object | None,
    causal: bool,
    rows: QueryRows,
    scaling: float | None,
) -> QKProblem:
    """Check shapes, dtypes, devices, finiteness and rows; flatten the batch dimensions.

    Args:
        query: ``(*batch, H_q, n_q, d_k)``.
        key: ``(*batch, H_kv, n, d_k)``.
        values: ``(*batch, H_kv, n, d_v)`` or ``None``.
        key_mask: ``(*batch, n)`` booleans or 0/1, or ``None``.
        causal: whether query ``i`` sees keys ``<= i`` only (needs ``n_q == n``).
        rows: the query positions requested (see :data:`QueryRows`).
        scaling: the score scale, or ``None`` for ``1 / sqrt(d_k)``.

    Raises:
        TypeError: a non-tensor or non-floating-point input, query and key of different dtypes,
            or rows that are not integers.
        ValueError: shapes that do not fit, query heads not a multiple of key heads, leading
            dimensions that do not broadcast, tensors on different devices, NaN or inf, causal
            with ``n_q != n``, rows out of range, a non-finite scaling, or a requested row that
            sees no real key.
    """
    q = _heads_tensor("query", query, QUERY_SHAPE)
    k = _heads_tensor("key", key, KEY_SHAPE)
    _check_key_fits_query(q, k)
    if q.shape[-1] == 0:
        raise ValueError(
            f"query and key must have d_k >= 1 features in shape {QUERY_SHAPE}; got query of "
            f"shape {tuple(q.shape)}"
        )
    v = None if values is None else _check_values_fit_key(values, k)
    n_q, n = q.shape[-2], k.shape[-2]
    mask = None if key_mask is None else check_key_mask(key_mask, n, "query", q.device)
    named = {"query": q.shape[:-3], "key": k.shape[:-3]}
    if v is not None:
        named["values"] = v.shape[:-3]
    if mask is not None:
        named["key_mask"] = mask.shape[:-1]
    batch_shape = _broadcast_batch(named)
    _check_causal_square(causal, n_q, n)
    scale = _score_scale(scaling, q.shape[-1])
    for name, tensor in (("query", q), ("key", k), ("values", v)):
        if tensor is not None:
            _require_finite(name, tensor)
    index = _query_rows(rows, n_q, q.device)
    size = math.prod(batch_shape)

    def flat(tensor: torch.Tensor, tail: int) -> torch.Tensor:
        trailing = tensor.shape[-tail:]
        return tensor.expand(*batch_shape, *trailing).reshape(size, *trailing)

    if mask is not None:
        mask = flat(mask, 1)
        _require_visible_keys(mask, index, causal, batch_shape)
    return QKProblem(
        query=flat(q, 3),
        key=flat(k, 3),
        values=None if v is None else flat(v, 3),
        key_mask=mask,
        rows=index,
        scale=scale,
        batch_shape=batch_shape,
    )


# --- kernel operands ----------------------------------------------------------------------------


def check_same_device(
    name: str, anchor_name: str, anchor: torch.Tensor, others: Mapping[str, torch.Tensor | None]
) -> None:
    """Raise ``ValueError`` unless every tensor of ``others`` is on ``anchor``'s device."""
    for label, tensor in others.items():
        if tensor is not None and tensor.device != anchor.device:
            raise ValueError(
                f"{name}: {anchor_name} is on {anchor.device} but {label} on {tensor.device}"
            )


def _one_device(name: str, tensors: Mapping[str, torch.Tensor]) -> torch.device:
    devices = {key: t.device for key, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{key} on {device}" for key, device in devices.items())
        raise ValueError(f"{name}: all tensors must be on one device; got {listed}")
    return next(iter(devices.values()))


def _one_dtype(name: str, tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    kinds = {key: t.dtype for key, t in tensors.items()}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{key} {dtype}" for key, dtype in kinds.items())
        raise TypeError(f"{name}: operands must share one dtype; got {listed}")
    return next(iter(kinds.values()))


def _supported_dtype(
    name: str, dtype: torch.dtype, dtypes: tuple[torch.dtype, ...], interpreted: bool
) -> None:
    if dtype not in dtypes:
        raise TypeError(
            f"{name}: dtype {dtype} is not supported; the kernel takes "
            + ", ".join(str(d) for d in dtypes)
        )
    if dtype == torch.bfloat16 and interpreted:
        raise TypeError(
            f"{name}: bfloat16 cannot run in Triton's interpreter (its tl.dot returns wrong "
            "results for bfloat16); cast to float16 or float32, or use backend='torch'"
        )


def check_kernel_operands(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    dtypes: tuple[torch.dtype, ...],
    interpreted: bool,
) -> None:
    """Check that a kernel can take ``tensors``: one device it runs on, one supported dtype.

    Args:
        name: the kernel's name, for messages.
        tensors: the floating-point operands by argument name (all must share one dtype).
        dtypes: the dtypes the kernel supports.
        interpreted: whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``).

    Raises:
        KernelUnavailableError: tensors on a device the kernels cannot use.
        TypeError: an unsupported or mixed dtype (bfloat16 in the interpreter, whose ``tl.dot``
            returns wrong numbers for it).
        ValueError: tensors on different devices.
    """
    check_device(name, _one_device(name, tensors), interpreted)
    _supported_dtype(name, _one_dtype(name, tensors), dtypes, interpreted)
