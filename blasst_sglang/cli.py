"""The ``blasst`` command line.

Each entry of :data:`SUBCOMMANDS` names a function ``add_subcommand(subparsers)`` as
``"module:function"``. It adds one subcommand parser and sets its ``run`` default to a callable
``run(args) -> int`` (the exit status). Add a subcommand by appending its entry.
"""

from __future__ import annotations

import argparse
import importlib
from typing import List, Optional

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS: List[str] = [
    "blasst_sglang.demo:add_subcommand",
    "blasst_sglang.calibration:add_subcommand",
    "blasst_sglang.evaluate:add_subcommand",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``blasst`` parser with every subcommand of :data:`SUBCOMMANDS` registered."""
    parser = argparse.ArgumentParser(prog="blasst", description="BLASST sparse attention: demos and tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in SUBCOMMANDS:
        module, _, func = entry.partition(":")
        getattr(importlib.import_module(module), func)(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``blasst`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
