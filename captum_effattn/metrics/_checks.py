"""Argument checks shared by the metrics entry points (texts, targets, lengths, counts).

Every check raises a ``TypeError`` (wrong kind of value) or a ``ValueError`` (right kind, impossible
value) whose message starts with the argument's name.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_MAX_LENGTH = 256
"""Word pieces kept per text when ``max_length`` is not given (fewer if the model has fewer
positions)."""

# Tokenizers report a huge sentinel as ``model_max_length`` when they know of no limit.
_NO_TOKENIZER_LIMIT = 10**9


def check_positive_int(value: Any, what: str) -> int:
    """``value`` as an int of at least 1.

    Raises:
        TypeError: not an int (bools are not counts).
        ValueError: below 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1; got {value}")
    return int(value)


def check_texts(texts: Any, what: str = "texts") -> list[str]:
    """``texts`` as a non-empty list of non-blank strings.

    A single string is refused rather than iterated (that would explain one text per
    character).

    Raises:
        TypeError: ``texts`` is a single string, not iterable, or holds a non-string.
        ValueError: no texts, or a blank one.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"{what} must be a list of texts, not a single {type(texts).__name__}: pass "
            f"[{texts!r}] to explain one text"
        )
    if isinstance(texts, Tensor) or not hasattr(texts, "__iter__"):
        raise TypeError(
            f"{what} must be a list of str (token ids go through gated_inputs); got "
            f"{type(texts).__name__}"
        )
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what} is empty: no texts to encode")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{index}] is {type(text).__name__}, not str: {text!r}")
        if not text.strip():
            raise ValueError(f"text {index} is empty ({text!r}): there is nothing to explain")
    return texts


def longest_input(model: nn.Module, tokenizer: Any = None) -> int | None:
    """The most tokens ``model`` (and ``tokenizer``) accept, or ``None`` if neither says."""
    config = getattr(model, "config", None)
    limits = [getattr(config, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [int(x) for x in limits if isinstance(x, numbers.Integral)]
    known = [x for x in known if 0 < x < _NO_TOKENIZER_LIMIT]
    return min(known) if known else None


def check_max_length(max_length: Any, model: nn.Module, tokenizer: Any) -> int:
    """``max_length`` (default :data:`DEFAULT_MAX_LENGTH`, capped by the model) as an int that
    holds the tokenizer's special tokens plus one word and fits the model's positions.

    Raises:
        TypeError: not an int.
        ValueError: too short for ``[CLS] word [SEP]`` (or the tokenizer's own template), or
            longer than the model's position embeddings.
    """
    longest = longest_input(model, tokenizer)
    if max_length is None:
        return DEFAULT_MAX_LENGTH if longest is None else min(DEFAULT_MAX_LENGTH, longest)
    max_length = check_positive_int(max_length, "max_length")
    count_specials = getattr(tokenizer, "num_special_tokens_to_add", None)
    shortest = 1 + (int(count_specials(pair=False)) if callable(count_specials) else 0)
    if max_length < shortest:
        raise ValueError(
            f"max_length must be at least {shortest} (the tokenizer's {shortest - 1} special "
            f"tokens and one word); got {max_length}"
        )
    if longest is not None and max_length > longest:
        raise ValueError(
            f"max_length {max_length} is longer than the {longest} positions "
            f"{type(model).__name__} accepts (config.max_position_embeddings / the tokenizer's "
            "model_max_length)"
        )
    return max_length


def _integral(values: list[Any]) -> bool:
    return all(
        not isinstance(v, bool)
        and isinstance(v, numbers.Real)
        and math.isfinite(v)
        and float(v).is_integer()
        for v in values
    )


def _target_values(targets: Any) -> list[Any]:
    """The entries of a sequence or 1-D tensor of targets, as Python numbers where possible."""
    if isinstance(targets, Tensor):
        if targets.dim() > 1:
            raise ValueError(
                f"targets must be (B,), one class per text; got shape {tuple(targets.shape)}"
            )
        return targets.reshape(-1).tolist()
    if hasattr(targets, "__iter__") and not isinstance(targets, (str, bytes, dict)):
        return [v.item() if isinstance(v, Tensor) and v.numel() == 1 else v for v in targets]
    raise TypeError(
        "targets must be class indices (a list or (B,) tensor of ints, or one int), "
        f"'predicted', or None; got {type(targets).__name__}"
    )


def class_indices(targets: Any, count: int) -> Tensor:
    """``(count,)`` long tensor of class indices from a sequence, a tensor, or one int for all.

    Float values are accepted only when they are whole numbers: ``0.9`` is not class 0.

    Raises:
        TypeError: not a sequence, tensor or int of class indices.
        ValueError: not one target per text, or a value that is not a whole number.
    """
    if isinstance(targets, numbers.Integral) and not isinstance(targets, bool):
        return torch.full((count,), int(targets), dtype=torch.long)
    values = _target_values(targets)
    if len(values) != count:
        raise ValueError(f"got {len(values)} targets for {count} texts")
    wrong = [v for v in values if not _integral([v])]
    if wrong:
        raise ValueError(
            f"targets must be whole-number class indices; got {wrong[:5]} (a float target is "
            "not truncated to a class)"
        )
    return torch.tensor([int(v) for v in values], dtype=torch.long)


def check_fraction(value: Any, what: str) -> float:
    """``value`` as a float in ``(0, 1]``.

    Raises:
        TypeError: not a real number.
        ValueError: outside ``(0, 1]`` (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in (0, 1]; got {type(value).__name__} {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be in (0, 1]; got {value}")
    return float(value)


def check_seed(seed: Any) -> int:
    """``seed`` as a non-negative int (what ``torch.Generator.manual_seed`` takes).

    Raises:
        TypeError: not an int.
        ValueError: negative.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed}")
    return int(seed)
