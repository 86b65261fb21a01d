"""The output table: its columns, their Arrow types, and the run settings kept in its metadata.

One row per input row, in this column order:

- ``id``: the ``id_column`` value, or the row's 0-based index in the input when there is none;
- ``text`` (``string``): the input text (undecodable bytes replaced by U+FFFD);
- ``label``: the ``label_column`` value, only when one is given (the input's type);
- ``tokens`` (``list<string>``): the word pieces the model read, special tokens included, padding
  excluded, truncated to ``max_length``;
- ``scores_<method>`` (``list<float32>``), one per method: a score per token, aligned with
  ``tokens``;
- ``predicted_label`` (``int64``) and ``predicted_label_name`` (``string``, null when the config
  names its labels only ``LABEL_<i>``): the model's prediction;
- ``probability`` (``float32``): the softmax probability of the predicted label;
- ``convergence_delta`` (``float64``): the largest relative head-output error of the projected
  attention rows over the methods (0 for ``raw``);
- ``error`` (``string``): null when the row was explained, else why not (then every result column
  is null).

The schema metadata key ``captum_effattn`` holds JSON describing the run (model identity,
methods, ``max_length``, column names); ``resume`` compares it before adding rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from captum_effattn.dataset.methods import Method

ID, TEXT, LABEL, TOKENS = "id", "text", "label", "tokens"
PREDICTED_LABEL, PREDICTED_LABEL_NAME = "predicted_label", "predicted_label_name"
PROBABILITY, CONVERGENCE_DELTA, ERROR = "probability", "convergence_delta", "error"
ROW_INDEX = "__row_index"
"""Internal column carrying each row's input position through an engine (never written)."""
METADATA_KEY = b"captum_effattn"
FORMAT_VERSION = 1
RESUME_KEYS = ("model", "methods", "max_length", "text_column", "id_column", "label_column")
"""Settings that must match for ``resume`` to add rows to an existing output."""


@dataclass(frozen=True)
class InputColumns:
    """Which input columns hold the text, the id and the gold label."""

    text: str = "text"
    id: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class OutputLayout:
    """Everything that shapes the output table.

    Attributes:
        methods: one score column each.
        id_type: Arrow type of ``id`` (``int64`` for row indices).
        label_type: Arrow type of ``label``, or ``None`` when there is no label column.
    """

    methods: tuple[Method, ...]
    id_type: pa.DataType = pa.int64()  # noqa: RUF009 (immutable)
    label_type: pa.DataType | None = None

    def schema(self, metadata: dict[str, Any] | None = None) -> pa.Schema:
        fields = [pa.field(ID, self.id_type), pa.field(TEXT, pa.string())]
        if self.label_type is not None:
            fields.append(pa.field(LABEL, self.label_type))
        fields.append(pa.field(TOKENS, pa.list_(pa.string())))
        fields += [pa.field(method.column, pa.list_(pa.float32())) for method in self.methods]
        fields += [
            pa.field(PREDICTED_LABEL, pa.int64()),
            pa.field(PREDICTED_LABEL_NAME, pa.string()),
            pa.field(PROBABILITY, pa.float32()),
            pa.field(CONVERGENCE_DELTA, pa.float64()),
            pa.field(ERROR, pa.string()),
        ]
        encoded = None if metadata is None else {METADATA_KEY: json.dumps(metadata).encode()}
        return pa.schema(fields, metadata=encoded)

    def with_row_index(self) -> pa.Schema:
        """The schema engines produce: :meth:`schema` plus the internal row-index column."""
        return self.schema().append(pa.field(ROW_INDEX, pa.int64()))


def layout_for(input_schema: pa.Schema, columns: InputColumns, methods) -> OutputLayout:
    """The output layout for an input of ``input_schema`` (whose columns were checked)."""
    id_type = pa.int64() if columns.id is None else input_schema.field(columns.id).type
    label_type = None if columns.label is None else input_schema.field(columns.label).type
    return OutputLayout(tuple(methods), id_type=id_type, label_type=label_type)


def run_metadata(
    model_identity: dict[str, str],
    methods: tuple[Method, ...],
    max_length: int,
    columns: InputColumns,
) -> dict[str, Any]:
    """The JSON kept in the output's schema metadata."""
    from captum_effattn import __version__

    return {
        "format_version": FORMAT_VERSION,
        "model": model_identity,
        "methods": [method.name for method in methods],
        "max_length": max_length,
        "text_column": columns.text,
        "id_column": columns.id,
        "label_column": columns.label,
        "captum_effattn_version": __version__,
    }


def read_metadata(schema: pa.Schema) -> dict[str, Any] | None:
    """The run metadata of an output's schema, or ``None`` when it has none."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return None if raw is None else json.loads(raw)
