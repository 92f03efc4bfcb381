"""Benchmarks behind ``rlsedit bench …``.

Each benchmark module's CLI registration adds its own subcommand to the shared ``bench``
group through :func:`get_bench_subparsers`, so ``solver``, ``speed`` and the method
benchmark can live in separate modules without knowing about each other.
"""

from __future__ import annotations

import argparse

BENCH_COMMAND = "bench"


def get_bench_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Return the sub-subparsers of ``rlsedit bench``, creating the group on first use.

    ``subparsers`` is the top-level object passed to every ``register(subparsers)``. The
    first caller creates ``bench`` (with a required sub-command); later callers get the same
    object back, so each benchmark module adds its own ``bench <name>`` parser to it.
    """
    existing = subparsers.choices.get(BENCH_COMMAND)
    if existing is None:
        bench_parser = subparsers.add_parser(
            BENCH_COMMAND,
            help="benchmarks (solver cost, editing speed, method quality)",
            description="Benchmarks. Each writes nothing unless asked (see each sub-command's options).",
        )
        bench_subparsers = bench_parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
        bench_subparsers.required = True
        return bench_subparsers
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError(f"the {BENCH_COMMAND!r} command exists but has no sub-commands; it was registered elsewhere")
