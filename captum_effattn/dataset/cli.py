"""``python -m captum_effattn explain``: the command line of :func:`explain_dataset`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captum_effattn.dataset.errors import DatasetInputError
from captum_effattn.dataset.methods import DEFAULT_METHODS, available_methods

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """Explain every text of a CSV, JSON-lines or Parquet file into one Parquet file:
per row the word pieces, a list of token scores per method, the predicted label and its
probability, the convergence delta, and an error message for rows that cannot be explained."""


def add_explain_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand to ``subparsers``."""
    from captum_effattn.dataset.explain import DEFAULT_BATCH_SIZE, DEFAULT_CHECKPOINT_ROWS

    parser = subparsers.add_parser(
        "explain", help="explain a dataset into Parquet", description=DESCRIPTION
    )
    parser.add_argument("--input", required=True, type=Path, help=".csv, .jsonl or .parquet file")
    parser.add_argument("--output", required=True, type=Path, help="Parquet file to write")
    parser.add_argument("--text-column", default="text", help="column of texts (default: text)")
    parser.add_argument("--id-column", help="column of row ids (default: the row index)")
    parser.add_argument("--label-column", help="column of gold labels, copied to `label`")
    parser.add_argument(
        "--model",
        type=Path,
        help="directory of a saved Hugging Face sequence classifier with its tokenizer "
        "(default: the package's fine-tuned MiniLM, trained and cached on first use)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods, each a score column (choices: "
        f"{', '.join(available_methods())}; default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="texts per forward pass"
    )
    parser.add_argument(
        "--max-length", type=int, help="word pieces kept per text (default: the model's maximum)"
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        help="where to run: this process, or Ray Data actors (default: ray when --ray-address "
        "is given, else local)",
    )
    parser.add_argument(
        "--ray-address", help="join this running Ray cluster (default: start a local one)"
    )
    parser.add_argument(
        "--ray-actors", type=int, help="Ray model actors (default: one per GPU, else per CPU)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the output's rows; explain only new ids"
    )
    parser.add_argument(
        "--checkpoint-rows",
        type=int,
        default=DEFAULT_CHECKPOINT_ROWS,
        help="local engine: write the output every this many rows, 0 for only at the end "
        "(default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_explain)
    return parser


def run_explain(args: argparse.Namespace) -> int:
    """Run ``explain`` with parsed arguments; the summary is the last line on stderr."""
    from captum_effattn.dataset.explain import explain_dataset

    try:
        summary = explain_dataset(
            args.input,
            args.output,
            text_column=args.text_column,
            id_column=args.id_column,
            label_column=args.label_column,
            model=args.model,
            methods=args.methods,
            batch_size=args.batch_size,
            max_length=args.max_length,
            engine=args.engine,
            ray_address=args.ray_address,
            resume=args.resume,
            progress=not args.no_progress,
            checkpoint_rows=args.checkpoint_rows,
            ray_actors=args.ray_actors,
        )
    except DatasetInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"interrupted: {args.output} holds only complete results (the file as it was, or the "
            "last checkpoint); run again with --resume to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(summary, file=sys.stderr)
    return 0
