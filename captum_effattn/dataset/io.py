"""Reading inputs (CSV, JSON lines, Parquet), checking them, and writing Parquet atomically.

The text column is read as bytes from CSV, so a row whose text is not valid UTF-8 becomes an error
row instead of failing the whole file.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from captum_effattn.dataset.errors import (
    InputFileError,
    MissingColumnError,
    OutputPathError,
)
from captum_effattn.dataset.schema import InputColumns

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
"""Input file extensions and the format each is read as."""
JSONL_SCHEMA_BYTES = 1 << 20
"""How much of a JSON-lines file is parsed to learn its columns before any work."""
OUTPUT_FILE_MODE = 0o644


def input_format(path: Path) -> str:
    """The format of ``path`` by its extension.

    Raises:
        InputFileError: unsupported extension, missing file, or a directory.
    """
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputFileError(
            f"cannot read {path}: unknown extension {path.suffix!r}; "
            f"supported: {', '.join(FORMATS)}"
        )
    if not path.exists():
        raise InputFileError(f"input file {path} does not exist")
    if not path.is_file():
        raise InputFileError(f"input {path} is not a file")
    return fmt


def csv_convert_options(text_column: str) -> pacsv.ConvertOptions:
    """Read the text column as bytes: undecodable rows become error rows, not a failed read."""
    return pacsv.ConvertOptions(column_types={text_column: pa.binary()})


def read_input(path: Path, text_column: str) -> pa.Table:
    """The whole input file as a table.

    Raises:
        InputFileError: see :func:`input_format`; the file cannot be parsed as its format.
    """
    fmt = input_format(path)
    readers = {
        "csv": lambda: pacsv.read_csv(path, convert_options=csv_convert_options(text_column)),
        "jsonl": lambda: pajson.read_json(path),
        "parquet": lambda: pq.read_table(path),
    }
    return _readable(path, fmt, readers[fmt])


def read_input_schema(path: Path, text_column: str) -> pa.Schema:
    """The input's columns, read cheaply (a Parquet footer, a first block of CSV or JSON).

    Raises:
        InputFileError: see :func:`read_input`.
    """
    fmt = input_format(path)

    def jsonl_head() -> pa.Schema:
        with open(path, "rb") as handle:
            head = handle.read(JSONL_SCHEMA_BYTES)
        if len(head) == JSONL_SCHEMA_BYTES and b"\n" in head:
            head = head[: head.rindex(b"\n") + 1]
        return pajson.read_json(io.BytesIO(head)).schema

    readers = {
        "csv": lambda: (
            pacsv.open_csv(path, convert_options=csv_convert_options(text_column)).schema
        ),
        "jsonl": jsonl_head,
        "parquet": lambda: pq.read_schema(path),
    }
    return _readable(path, fmt, readers[fmt])


def _readable(path: Path, fmt: str, read):
    try:
        return read()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read {path} as {fmt}: {exc}") from exc


def check_columns(schema: pa.Schema, columns: InputColumns, path: Path) -> None:
    """Raise :class:`MissingColumnError` naming the first missing column and the ones present."""
    wanted = {"--text-column": columns.text, "--id-column": columns.id}
    wanted["--label-column"] = columns.label
    for option, name in wanted.items():
        if name is not None and name not in schema.names:
            raise MissingColumnError(
                f"column {name!r} ({option}) is not in {path}; its columns are: "
                f"{', '.join(schema.names) or '(none)'}"
            )


def check_output_path(output: Path, input_path: Path) -> None:
    """Raise :class:`OutputPathError` unless ``output`` can be written as a file."""
    if not output.parent.is_dir():
        raise OutputPathError(f"the output's directory {output.parent} does not exist")
    if output.is_dir():
        raise OutputPathError(f"output {output} is a directory; give a file name")
    if output.exists() and output.resolve() == input_path.resolve():
        raise OutputPathError(f"output {output} is the input file")


def write_table_atomically(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` as Parquet through a temporary file in the same directory
    renamed into place, so ``path`` only ever holds a complete file (even on KeyboardInterrupt)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        pq.write_table(table, temporary)
        os.chmod(temporary, OUTPUT_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
