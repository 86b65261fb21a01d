"""Which attention rows explain a prediction: the query positions, per example.

Encoders read the prediction off the first real token ([CLS]); decoders off the last real token,
whose row sees every token before it. ``query`` may also name a position, or ``"all"`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

QuerySpec = Literal["auto", "all"] | int
"""``"auto"`` (first real token for encoders, last real token for decoders), an int position
(negative counts from the end of the sequence), or ``"all"`` rows."""


@dataclass(frozen=True)
class QueryRows:
    """The rows to project, per example.

    Attributes:
        positions: ``(B, Q)`` query position of each row (``Q = 1`` for a single row per
            example, ``Q = S`` for ``"all"``).
        real: ``(B, Q)`` whether the row belongs to a real (non-padding) token; padding rows are
            left out of every reduction.
        all_rows: ``positions`` is every row ``0..S-1`` for every example.
    """

    positions: torch.Tensor
    real: torch.Tensor
    all_rows: bool


def _first_real(key_mask: torch.Tensor) -> torch.Tensor:
    return key_mask.to(torch.int8).argmax(-1)


def _last_real(key_mask: torch.Tensor) -> torch.Tensor:
    length = key_mask.shape[-1]
    return length - 1 - key_mask.flip(-1).to(torch.int8).argmax(-1)


def select_query_rows(query: QuerySpec, key_mask: torch.Tensor, causal: bool) -> QueryRows:
    """Resolve ``query`` against the real tokens of each example.

    Args:
        query: see :data:`QuerySpec`.
        key_mask: ``(B, S)`` real tokens of each example.
        causal: the model's attention is causal (``"auto"`` then takes the last real token).

    Raises:
        ValueError: an example with no real token; an unknown ``query``, a position outside
            ``-S..S-1``, or a position that is padding in some example.
    """
    batch, length = key_mask.shape
    empty = ~key_mask.any(-1)
    if empty.any():
        example = int(empty.nonzero()[0])
        raise ValueError(
            f"example {example} is all padding (its attention mask has no real token): each "
            "example needs at least one real token to attribute"
        )
    if isinstance(query, str):
        if query == "all":
            positions = torch.arange(length, device=key_mask.device).expand(batch, length)
            return QueryRows(positions, key_mask, all_rows=True)
        if query == "auto":
            position = _last_real(key_mask) if causal else _first_real(key_mask)
            return QueryRows(position[:, None], key_mask.new_ones(batch, 1), all_rows=False)
        raise ValueError(f"query must be 'auto', 'all' or an int position; got {query!r}")
    if isinstance(query, bool) or not isinstance(query, int):
        raise TypeError(f"query must be 'auto', 'all' or an int position; got {query!r}")
    if not -length <= query < length:
        raise ValueError(
            f"query position {query} is out of range for sequences of {length} tokens "
            f"(valid: {-length}..{length - 1})"
        )
    index = query % length
    padding = ~key_mask[:, index]
    if padding.any():
        example = int(padding.nonzero()[0])
        raise ValueError(
            f"query position {query} is a padding token in example {example}; choose a position "
            "that is a real token in every example, or query='auto'"
        )
    positions = torch.full((batch, 1), index, device=key_mask.device)
    return QueryRows(positions, key_mask.new_ones(batch, 1), all_rows=False)
