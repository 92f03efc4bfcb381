"""``rlsedit bench solver``: the command-line face of :mod:`rlsedit.bench.solver`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlsedit.errors import InvalidRequestError

from . import get_bench_subparsers
from .solver import SolverBenchConfig, format_markdown_table, plot_solver_bench, run_solver_bench

_HELP = {name: f.metadata["help"] for name, f in SolverBenchConfig.__dataclass_fields__.items()}
_DEFAULTS = SolverBenchConfig()


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _joined(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = get_bench_subparsers(subparsers).add_parser(
        "solver",
        help="cost of one RLS update vs history, GEMM rate and MEMIT-seq",
        description=(
            "Times one RLSState.update at each history length, this run's GEMM rate on the same shapes, "
            "and one MEMIT-seq re-solve; checks the recursion against the one-shot solution. "
            "Prints a Markdown table (or JSON with --json); writes a plot only with --plot."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--device", default=_DEFAULTS.device, help=_HELP["device"])
    parser.add_argument("--dk", type=_int_list, default=_DEFAULTS.dks, help=f"{_HELP['dks']} (default {_joined(_DEFAULTS.dks)})")
    parser.add_argument("--dv", type=_int_list, default=None, help=_HELP["dvs"])
    parser.add_argument("--u", type=_int_list, default=_DEFAULTS.us, help=f"{_HELP['us']} (default {_joined(_DEFAULTS.us)})")
    parser.add_argument(
        "--history", type=_int_list, default=_DEFAULTS.histories,
        help=f"{_HELP['histories']} (default {_joined(_DEFAULTS.histories)})",
    )
    parser.add_argument("--repeats", type=int, default=_DEFAULTS.repeats, help=f"{_HELP['repeats']} (default {_DEFAULTS.repeats})")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=_DEFAULTS.dtype, help=_HELP["dtype"])
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=_HELP["seed"])
    parser.add_argument("--drive-chunk", type=int, default=_DEFAULTS.drive_chunk, help=_HELP["drive_chunk"])
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot of the result to this path")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads for this run (default: torch's own choice); recorded in the result",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidRequestError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = SolverBenchConfig(
        dks=args.dk,
        dvs=args.dv,
        us=args.u,
        histories=args.history,
        repeats=args.repeats,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        drive_chunk=args.drive_chunk,
    )
    result = run_solver_bench(config)
    if args.plot is not None:
        plot_solver_bench(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_markdown_table(result))
        print(
            f"\nmax relative error vs one-shot (float64): {result['max_rel_err_vs_oneshot']:.2e}; "
            f"float32: {result['max_rel_err_vs_oneshot_float32']:.2e}; wall {result['wall_s']:.1f} s"
        )
    return 0
