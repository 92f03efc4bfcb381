"""The ``rlsedit`` command: a thin layer over the library.

Each subcommand lives in the module that owns its concept and registers itself through a
``register(subparsers)`` function listed in :data:`COMMAND_MODULES`. Library errors
(:class:`~rlsedit.errors.RLSEditError`) become one line on stderr and the error's exit code
(the table is in :mod:`rlsedit.errors` and in ``rlsedit --help``).

Progress bars: shown by default when stderr is a terminal, never when it is not or with
``--quiet``; the libraries' own bars (transformers' "Loading weights") never show.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rlsedit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (they show by default when stderr is a terminal)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


EXIT_CODES_HELP = """exit codes: 0 ok, 1 unexpected error (a bug), 2 usage, 3 invalid input (also edit --skip-bad
when every edit was skipped), 4 state locked by another process, 5 state file corrupt, 6 state made
for another model/method/settings, 7 numerical refusal, 8 model not loadable, 9 not supported by
the method, 10 other state problem"""


def main(argv: list[str] | None = None) -> int:
    # transformers' own progress bars ("Loading weights") read this switch when it is imported;
    # an embedding program may have imported it already, so switch them off there too
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "progress"):  # commands with long work: edit, stats, bench, eval, demo
        args.progress = not args.quiet and (args.progress or sys.stderr.isatty())
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # freed activations go back to the system instead of fragmenting the heap (rlsedit/heap.py)
    pin_mmap_threshold()
    try:
        return int(args.func(args) or 0)
    except RLSEditError as exc:
        print(f"rlsedit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rlsedit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
