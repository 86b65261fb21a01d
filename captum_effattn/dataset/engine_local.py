"""The local engine: the input read whole, explained in batches in this process."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from captum_effattn.dataset.explainer import BatchExplainer, drop_done_rows
from captum_effattn.dataset.io import read_input
from captum_effattn.dataset.schema import ROW_INDEX


def run_local(
    explainer: BatchExplainer,
    input_path: Path,
    done_ids: pa.Array | None,
    *,
    progress: bool = True,
    on_batch: Callable[[list[pa.Table]], None] | None = None,
) -> pa.Table:
    """Explain every row of ``input_path`` whose id is not in ``done_ids``.

    Args:
        explainer: what explains each batch (its settings name the columns and batch size).
        input_path: a CSV, JSON-lines or Parquet file.
        done_ids: ids to skip (``resume``), or ``None``.
        progress: show a tqdm bar (rows, rows/s) on stderr.
        on_batch: called with the tables explained so far after each batch (checkpoints).

    Returns:
        The explained rows in input order: the output layout plus the row-index column.
    """
    settings = explainer.settings
    table = read_input(input_path, settings.columns.text)
    table = table.append_column(ROW_INDEX, pa.array(range(table.num_rows), pa.int64()))
    table = drop_done_rows(table, settings.columns, done_ids).combine_chunks()
    parts: list[pa.Table] = []
    with tqdm(
        total=table.num_rows, unit="row", desc="explaining", disable=not progress, file=sys.stderr
    ) as bar:
        for batch in table.to_batches(max_chunksize=settings.batch_size):
            parts.append(explainer.explain_table(pa.Table.from_batches([batch])))
            bar.update(batch.num_rows)
            if on_batch is not None:
                on_batch(parts)
    if not parts:
        return settings.layout.with_row_index().empty_table()
    return pa.concat_tables(parts)
