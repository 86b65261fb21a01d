"""Reading an output of :func:`~captum_effattn.explain_dataset` back as tokens and score tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
import torch

from captum_effattn.dataset.methods import SCORES_PREFIX, WEIGHTING_SEPARATOR, Method
from captum_effattn.dataset.schema import (
    CONVERGENCE_DELTA,
    ERROR,
    ID,
    LABEL,
    PREDICTED_LABEL,
    PREDICTED_LABEL_NAME,
    PROBABILITY,
    TEXT,
    TOKENS,
    read_metadata,
)


@dataclass(frozen=True)
class ExplainedText:
    """One output row.

    Attributes:
        id: the row id (the input's id column, or its 0-based row index).
        text: the input text.
        tokens: the word pieces the model read (special tokens included), ``T`` of them; empty
            for an error row.
        scores: method name -> ``(T,)`` float32 tensor of token scores, aligned with
            ``tokens``; empty for an error row.
        predicted_label: the predicted class index (``None`` for an error row).
        predicted_label_name: its name in the model's config, if it has names.
        probability: softmax probability of the predicted class.
        convergence_delta: largest relative head-output error over the methods.
        error: why the row could not be explained, or ``None``.
        label: the gold label when the run had a label column.
    """

    id: Any
    text: str | None
    tokens: list[str]
    scores: dict[str, torch.Tensor]
    predicted_label: int | None
    predicted_label_name: str | None
    probability: float | None
    convergence_delta: float | None
    error: str | None
    label: Any = None

    def __getitem__(self, key: str) -> Any:
        """Field access by name (``row["tokens"]``), also by output column
        (``row["scores_efficient"]``)."""
        if key.startswith(SCORES_PREFIX) and key not in self.__dataclass_fields__:
            for name, scores in self.scores.items():
                if Method(*_split(name)).column == key:
                    return scores
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        raise KeyError(key)


def load_attributions(path: str | os.PathLike[str]) -> list[ExplainedText]:
    """The rows of an output Parquet file, in file order, with score tensors.

    Args:
        path: a file written by :func:`~captum_effattn.explain_dataset` (or
            ``python -m captum_effattn explain``).

    Returns:
        One :class:`ExplainedText` per row.
    """
    table = pq.read_table(path)
    metadata = read_metadata(table.schema) or {}
    if "methods" in metadata:
        names = {Method(*_split(name)).column: name for name in metadata["methods"]}
    else:
        names = {
            column: column[len(SCORES_PREFIX) :]
            for column in table.column_names
            if column.startswith(SCORES_PREFIX)
        }
    rows = []
    for row in table.to_pylist():
        scores = {
            name: torch.tensor(row[column], dtype=torch.float32)
            for column, name in names.items()
            if row[column] is not None
        }
        rows.append(
            ExplainedText(
                id=row[ID],
                text=row[TEXT],
                tokens=row[TOKENS] or [],
                scores=scores,
                predicted_label=row[PREDICTED_LABEL],
                predicted_label_name=row[PREDICTED_LABEL_NAME],
                probability=row[PROBABILITY],
                convergence_delta=row[CONVERGENCE_DELTA],
                error=row[ERROR],
                label=row.get(LABEL),
            )
        )
    return rows


def _split(name: str) -> tuple[str, str | None]:
    view, _, weighting = name.partition(WEIGHTING_SEPARATOR)
    return view, weighting or None
