"""The ``hmedn`` command line: ``hmedn <command> [options]`` (also ``python -m hmedn_fast <command>``).

Each command lives in its own module exposing ``add_parser(subparsers)``, which registers the subcommand
and sets ``func`` (called with the parsed ``argparse.Namespace``, returning the exit status). To add a
command, add its module to :data:`COMMAND_MODULES`.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Sequence

from hmedn_fast import __version__

COMMAND_MODULES: tuple[str, ...] = (
    "hmedn_fast.demo", "hmedn_fast.train.cli", "hmedn_fast.infer.cli", "hmedn_fast.export.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command of :data:`COMMAND_MODULES` registered."""
    parser = argparse.ArgumentParser(prog="hmedn", description="HMEDN: fast low-contrast medical image segmentation")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status (2: usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args))
