"""``python -m captum_effattn``: the package's command line (``explain``: a dataset into Parquet).

The demo has its own entry point, ``python -m captum_effattn.demo``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    from captum_effattn.dataset.cli import add_explain_parser

    parser = argparse.ArgumentParser(
        prog="python -m captum_effattn",
        description="Efficient attention (Naim & Asher, ECAI 2024) for Captum.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_explain_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
