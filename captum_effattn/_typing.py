"""Tensor aliases whose names carry their shapes.

The annotations are documentation for readers and type checkers; shapes are checked at run time by
the functions that accept them (see :mod:`captum_effattn.projection.engine.validation`).

Symbols follow the method page of the documentation (docs/method.md): ``n`` keys, ``q`` query rows,
``d`` value width (``d_v``), ``r`` the rank of the value space ``[V, 1]`` (at most ``d + 1``), and
``*batch`` any leading dimensions (batch, heads, ...), which broadcast.
"""

from __future__ import annotations

from typing import Annotated

import torch

AttentionRows = Annotated[torch.Tensor, "(*batch, q, n)"]
"""Post-softmax attention rows, one probability distribution over ``n`` keys per query."""

ValueVectors = Annotated[torch.Tensor, "(*batch, n, d)"]
"""A head's value vectors ``V`` (bias included), one per key."""

KeyMask = Annotated[torch.Tensor, "(*batch, n)"]
"""``True`` (or 1) marks a real key, ``False`` (0) a padding key."""

RowStatistic = Annotated[torch.Tensor, "(*batch, q)"]
"""One number per attention row (errors, iteration counts, flags)."""

FlatRows = Annotated[torch.Tensor, "(R, n)"]
"""Rows of several problems stacked for a batched solver."""

RowBases = Annotated[torch.Tensor, "(G, n, r)"]
"""One orthonormal basis (columns) per group of rows that share a value space."""

DualVariables = Annotated[torch.Tensor, "(R, r)"]
"""Coordinates ``theta`` in a row's basis: the solver's dual variables."""

__all__ = [
    "AttentionRows",
    "DualVariables",
    "FlatRows",
    "KeyMask",
    "RowBases",
    "RowStatistic",
    "ValueVectors",
]
