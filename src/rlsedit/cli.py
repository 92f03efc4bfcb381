"""The ``rlsedit`` command: a thin layer over the library.

Each subcommand lives in the module that owns its concept and registers itself through a
``register(subparsers)`` function listed in :data:`COMMAND_MODULES`. Library errors
(:class:`~rlsedit.errors.RLSEditError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import RLSEditError
from .heap import pin_mmap_threshold

# module path -> it defines register(subparsers) adding one or more subcommands
COMMAND_MODULES: tuple[str, ...] = (
    "rlsedit.session.cli",
    "rlsedit.bench.solver_cli",
    "rlsedit.locate.stats_cli",
    "rlsedit.eval.cli",
    "rlsedit.bench.methods_cli",
    "rlsedit.bench.speed_cli",
    "rlsedit.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlsedit",
        description="Lifelong knowledge editing of LLMs (RLSEdit, MEMIT, AlphaEdit, ROME, FT).",
    )
    parser.add_argument("--version", action="version", version=f"rlsedit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # freed activations go back to the system instead of fragmenting the heap (rlsedit/heap.py)
    pin_mmap_threshold()
    try:
        return int(args.func(args) or 0)
    except RLSEditError as exc:
        print(f"rlsedit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlsedit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
