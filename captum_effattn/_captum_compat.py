"""The one place that touches Captum's private helpers.

Captum's input contract (a tensor or a tuple of tensors; extra forward arguments appended as a
tuple; outputs returned in the inputs' form) is implemented by helpers in ``captum._utils``, which
are not public API and may move between releases. Every other module imports them from here, so a
Captum upgrade is checked and fixed in one file; ``tests/test_captum_compat.py`` compares each
wrapper with the installed Captum's own helper.

Tested with Captum 0.9.0 (the ``captum>=0.9,<0.10`` range of ``pyproject.toml``).
"""

from __future__ import annotations

from typing import Any

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import Attribution
from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens
from captum.log import log_usage
from torch import Tensor

TESTED_CAPTUM_VERSIONS = ("0.9.0",)
"""Captum releases this module was checked against (see the module docstring)."""

__all__ = [
    "TESTED_CAPTUM_VERSIONS",
    "Attribution",
    "TargetType",
    "TensorOrTupleOfTensorsGeneric",
    "convert_ids_to_pretty_tokens",
    "format_additional_forward_args",
    "format_output",
    "format_tensor_into_tuples",
    "is_tuple",
    "log_usage",
]


def is_tuple(inputs: Tensor | tuple[Tensor, ...]) -> bool:
    """Whether the user passed a tuple of tensors (outputs then come back as a tuple)."""
    return bool(_is_tuple(inputs))


def format_tensor_into_tuples(inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``inputs`` as a tuple of tensors: a single tensor becomes a 1-tuple.

    Raises:
        TypeError: ``inputs`` is neither a tensor nor a tuple (Captum asserts; the message is
            Captum's).
    """
    if inputs is None:
        raise TypeError("inputs must be a torch.Tensor or a tuple of tensors; got None")
    try:
        formatted = _format_tensor_into_tuples(inputs)
    except AssertionError as error:
        raise TypeError(str(error)) from None
    assert formatted is not None
    return formatted


def format_additional_forward_args(additional_forward_args: Any) -> tuple[Any, ...]:
    """Extra forward arguments as a tuple: ``None`` -> ``()``, a non-tuple ``x`` -> ``(x,)``."""
    formatted = _format_additional_forward_args(additional_forward_args)
    return () if formatted is None else formatted


def format_output(is_inputs_tuple: bool, output: tuple[Tensor, ...]) -> Any:
    """``output`` in the inputs' form: the tuple itself, or its only tensor."""
    return _format_output(is_inputs_tuple, output)


def convert_ids_to_pretty_tokens(ids: Tensor, tokenizer: Any) -> list[str]:
    """Token strings for display, as Captum's LLM attributions label their output tokens
    (byte-level markers such as ``Ġ`` replaced by the text they stand for)."""
    return list(_convert_ids_to_pretty_tokens(ids, tokenizer))
