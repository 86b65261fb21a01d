"""``explain_dataset``: explain every text of a file into one Parquet file.

Every check that can fail runs before any row is explained: the engine, the methods, the input
file and its columns, the output's directory, the Ray address, the model, and (with ``resume``)
the settings the existing output was written with.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from captum_effattn.dataset.errors import EngineUnavailableError, ResumeMismatchError
from captum_effattn.dataset.explainer import (
    BatchExplainer,
    ExplainerSettings,
    default_model,
    load_model,
    model_identity,
    resolve_max_length,
)
from captum_effattn.dataset.io import (
    check_columns,
    check_output_path,
    read_input_schema,
    write_table_atomically,
)
from captum_effattn.dataset.methods import DEFAULT_METHODS, parse_methods
from captum_effattn.dataset.schema import (
    ERROR,
    ID,
    RESUME_KEYS,
    ROW_INDEX,
    InputColumns,
    layout_for,
    read_metadata,
    run_metadata,
)

ENGINES = ("local", "ray")
DEFAULT_BATCH_SIZE = 16
DEFAULT_CHECKPOINT_ROWS = 10_000


@dataclass(frozen=True)
class ExplainSummary:
    """What :func:`explain_dataset` did.

    Attributes:
        output: the Parquet file written.
        rows_written: rows in it (with ``resume``, the earlier rows included).
        rows_explained: rows explained by this run, error rows included.
        rows_with_errors: rows of this run that could not be explained.
        rows_kept: rows of the existing output kept, whose ids were not explained again
            (``resume``).
        seconds: wall time of this run's explaining (loading the model in this process
            excluded; starting a Ray cluster and loading the model in its actors included).
        engine: ``"local"`` or ``"ray"``.
    """

    output: Path
    rows_written: int
    rows_explained: int
    rows_with_errors: int
    rows_kept: int
    seconds: float
    engine: str

    @property
    def rows_per_second(self) -> float:
        return self.rows_explained / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        kept = f", {self.rows_kept} kept from before (resume)" if self.rows_kept else ""
        return (
            f"wrote {self.rows_written} rows to {self.output}: {self.rows_explained} explained "
            f"now{kept}, {self.rows_with_errors} with errors; "
            f"{self.rows_per_second:.2f} rows/s ({self.engine} engine, {self.seconds:.1f} s)"
        )


def explain_dataset(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    text_column: str = "text",
    id_column: str | None = None,
    label_column: str | None = None,
    model: str | os.PathLike[str] | None = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    engine: str | None = None,
    ray_address: str | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    checkpoint_rows: int = DEFAULT_CHECKPOINT_ROWS,
    ray_actors: int | None = None,
    ray_num_cpus: int | None = None,
) -> ExplainSummary:
    """Explain every text of a CSV, JSON-lines or Parquet file into one Parquet file.

    Each row's text is tokenized (truncated to ``max_length``), classified, and its tokens scored
    by :class:`~captum_effattn.EfficientAttentionAttribution` with each method; the output schema
    is documented in :mod:`captum_effattn.dataset.schema` and the README. The output is written
    through a temporary file renamed into place: an interrupted run leaves the previous file (or
    none), never a partial one. The local engine also writes a complete output every
    ``checkpoint_rows`` rows, so ``resume=True`` continues an interrupted run.

    Args:
        input: a ``.csv``, ``.jsonl`` or ``.parquet`` file.
        output: the Parquet file to write; its directory must exist.
        text_column: the column of texts.
        id_column: a column of row ids; default: the row's 0-based index in the input.
        label_column: a column of gold labels, copied to the output's ``label`` column.
        model: a directory with a saved Hugging Face sequence classifier and its tokenizer;
            default: the package's fine-tuned MiniLM (trained and cached on first use).
        methods: method names (a comma-separated string or a sequence): a view of
            :data:`captum_effattn.attr.VIEWS`, optionally ``+WEIGHTING``; one score column each.
        batch_size: texts per forward pass (a positive int).
        max_length: word pieces kept per text; default: the model's maximum.
        engine: ``"local"`` (this process) or ``"ray"`` (Ray Data actors; ``pip install
            captum-effattn[ray]``); default ``"ray"`` when ``ray_address`` is given, else
            ``"local"``.
        ray_address: a running Ray cluster to join (``host:port``, ``ray://host:port`` or
            ``auto``); default: start a local cluster, shut down at the end.
        resume: keep the rows of an existing ``output`` and explain only input rows whose id it
            lacks; the existing output must come from the same model, methods, ``max_length``
            and columns.
        progress: progress bars on stderr (model training, rows explained).
        device: torch device for the model (local engine); default CUDA when available.
        checkpoint_rows: local engine: write the output every this many rows (0: only at the end).
        ray_actors: Ray engine: model actors; default one per GPU, else one per CPU but one
            (left to Ray Data's reading and writing tasks).
        ray_num_cpus: Ray engine: CPUs of the local cluster it starts; default all.

    Returns:
        An :class:`ExplainSummary`; ``str()`` of it is the line the command line prints last.

    Raises:
        DatasetInputError: any bad input, before any row is explained (a missing column names
            the columns present; an unknown method lists the valid ones); see
            :mod:`captum_effattn.dataset.errors` for the subclasses.
    """
    engine = _pick_engine(engine, ray_address)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    parsed = parse_methods(methods)
    input_path, output_path = Path(input), Path(output)
    columns = InputColumns(text_column, id_column, label_column)
    input_schema = read_input_schema(input_path, text_column)
    check_columns(input_schema, columns, input_path)
    check_output_path(output_path, input_path)
    existing = _existing_metadata(output_path) if resume else None
    if existing is not None:
        # Settings known before the model loads (the default model trains on first use).
        _check_resume(existing, run_metadata({}, parsed, 0, columns), ("methods", *RESUME_KEYS[3:]))
    ray_engine = _ray_engine(ray_address, progress) if engine == "ray" else None
    # A joined or started Ray cluster is left (shut down, disconnected) whatever happens.
    with ray_engine or contextlib.nullcontext():
        # With Ray the model here is only checked: keep it off the GPUs the actors will use.
        driver_device = "cpu" if ray_engine is not None else device
        model_dir, loaded_model, tokenizer, identity = _load(model, driver_device, progress)
        length = resolve_max_length(max_length, loaded_model, tokenizer)
        metadata = run_metadata(identity, parsed, length, columns)
        if existing is not None:
            _check_resume(existing, metadata, RESUME_KEYS)
        previous = pq.read_table(output_path) if existing is not None else None
        done_ids = None if previous is None else previous.column(ID).combine_chunks()

        layout = layout_for(input_schema, columns, parsed)
        schema = layout.schema(metadata)
        settings = ExplainerSettings(
            str(model_dir), parsed, length, batch_size, columns, layout, device
        )
        start = time.perf_counter()
        if ray_engine is None:
            explainer = BatchExplainer(settings, loaded_model, tokenizer)
            checkpoint = _Checkpoint(output_path, previous, schema, checkpoint_rows)
            from captum_effattn.dataset.engine_local import run_local

            new = run_local(explainer, input_path, done_ids, progress=progress, on_batch=checkpoint)
        else:
            del loaded_model  # each actor loads its own
            new = ray_engine.run(
                settings, input_path, output_path, done_ids, ray_actors, ray_num_cpus
            )
        seconds = time.perf_counter() - start
        table = _union(previous, new, schema)
        write_table_atomically(table, output_path)
        return ExplainSummary(
            output=output_path,
            rows_written=table.num_rows,
            rows_explained=new.num_rows,
            rows_with_errors=new.num_rows - pc.sum(pc.is_null(new.column(ERROR))).as_py(),
            rows_kept=0 if done_ids is None else len(done_ids),
            seconds=seconds,
            engine=engine,
        )


def _load(model, device: str | None, progress: bool):
    """``(directory, model, tokenizer, identity)`` of ``model``, or of the default model."""
    if model is None:
        directory, loaded, tokenizer = default_model(progress, device)
    else:
        directory = Path(model)
        loaded, tokenizer = load_model(directory, device)
    return directory, loaded, tokenizer, model_identity(directory, model is None)


def _pick_engine(engine: str | None, ray_address: str | None) -> str:
    if engine is None:
        return "local" if ray_address is None else "ray"
    if engine not in ENGINES:
        raise EngineUnavailableError(f"engine must be one of {ENGINES}; got {engine!r}")
    if engine == "local" and ray_address is not None:
        raise EngineUnavailableError(
            f"a Ray address ({ray_address}) needs engine 'ray', not 'local'"
        )
    return engine


def _ray_engine(address: str | None, progress: bool):
    try:
        from captum_effattn.dataset.engine_ray import RayEngine
    except ImportError as exc:
        raise EngineUnavailableError(
            f"engine 'ray' needs Ray Data: pip install 'captum-effattn[ray]' ({exc})"
        ) from exc
    return RayEngine(address, progress)


def _existing_metadata(output: Path) -> dict[str, Any] | None:
    if not output.exists():
        return None
    try:
        schema = pq.read_schema(output)
    except (pa.ArrowException, OSError) as exc:
        raise ResumeMismatchError(
            f"cannot resume: {output} is not a readable Parquet file"
        ) from exc
    metadata = read_metadata(schema)
    if metadata is None:
        raise ResumeMismatchError(
            f"cannot resume: {output} was not written by captum_effattn explain (no metadata)"
        )
    return metadata


def _check_resume(existing: dict[str, Any], wanted: dict[str, Any], keys: Sequence[str]) -> None:
    differences = [
        f"{key}: {existing.get(key)!r} there, {wanted[key]!r} now"
        for key in keys
        if existing.get(key) != wanted[key]
    ]
    if differences:
        raise ResumeMismatchError(
            "refusing to resume: the existing output was written with other settings and the "
            f"rows would mix ({'; '.join(differences)}); write to another output or drop --resume"
        )


def _union(previous: pa.Table | None, new: pa.Table, schema: pa.Schema) -> pa.Table:
    """The earlier rows, then the new ones in input order, under ``schema``."""
    new = new.drop_columns([ROW_INDEX]).cast(schema)
    if previous is None:
        return new
    return pa.concat_tables([previous.cast(schema), new])


class _Checkpoint:
    """Writes the output every ``every`` new rows (0: never) while the local engine runs."""

    def __init__(self, output: Path, previous, schema: pa.Schema, every: int) -> None:
        self.output, self.previous, self.schema, self.every = output, previous, schema, every
        self.written = 0

    def __call__(self, parts: list[pa.Table]) -> None:
        rows = sum(part.num_rows for part in parts)
        if self.every > 0 and rows - self.written >= self.every:
            table = _union(self.previous, pa.concat_tables(parts), self.schema)
            write_table_atomically(table, self.output)
            self.written = rows
