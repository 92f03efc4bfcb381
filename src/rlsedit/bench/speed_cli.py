"""``rlsedit bench speed``: the command-line face of :mod:`rlsedit.bench.speed`."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path

from ..errors import UsageError
from . import get_bench_subparsers
from .speed import SpeedBenchConfig, format_markdown, plot_speed, run_speed_bench

_FIELDS = {f.name: f for f in fields(SpeedBenchConfig)}


def _help(name: str) -> str:
    f = _FIELDS[name]
    default = "" if f.default is MISSING or f.default in (None, ()) else f" (default {f.default})"
    return f.metadata["help"] + default


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = get_bench_subparsers(subparsers).add_parser(
        "speed",
        help="seconds per edit of a session's stream, by phase, against the per-request reference",
        description=(
            "Streams the first N records of --data through a fresh session (journal and snapshots "
            "included) and times every batch by phase (targets, keys, solve, bookkeeping); checks "
            "that per-edit time stays flat from the first to the last tenth of the stream; runs the "
            "first --reference-n edits again through the per-request reference target optimisation "
            "for the speedup; reports efficacy of both and peak RSS. With --targets adam,onestep,verify "
            "the stream runs once per value-target method on the same edits, side by side (teacher-forced "
            "quality of all edits, generation metrics with --gen-n). Prints a Markdown summary, or "
            "JSON with --json; --out DIR also writes result.json, result.md and speed.png there."
        ),
    )
    parser.add_argument("--data", required=True, help=_help("data"))
    parser.add_argument("--model", default="smollm2", help=_help("model"))
    parser.add_argument("--method", default="rlsedit", help=_help("method"))
    parser.add_argument("--n", type=int, default=1000, help=_help("n"))
    parser.add_argument("--batch-size", type=int, default=20, help=_help("batch_size"))
    parser.add_argument("--reference-n", type=int, default=40, help=_help("reference_n"))
    parser.add_argument("--hparams", default=None, help=_help("hparams"))
    parser.add_argument("--corpus", default=None, help=_help("corpus"))
    parser.add_argument("--cache-dir", default=None, help=_help("cache_dir"))
    parser.add_argument("--device", default="cpu", help=_help("device"))
    parser.add_argument("--threads", type=int, default=None, help=_help("threads"))
    parser.add_argument("--state", "--state-dir", dest="state_dir", default=None, help=_help("state_dir"))
    parser.add_argument("--targets", default="", help=_help("targets") + "; comma-separated, e.g. adam,onestep,verify")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=JSON",
                        help="a named setting to compare, usable in --targets: LABEL={JSON overrides of the "
                             "method's config}, e.g. fast='{\"v_early_stop_nll\": 0.5}' (repeatable)")
    parser.add_argument("--gen-n", type=int, default=0, help=_help("gen_n"))
    parser.add_argument("--out", type=Path, default=None, help="write result.json, result.md and speed.png here")
    parser.add_argument("--progress", action="store_true",
                        help="show progress bars (default: when stderr is a terminal; -q hides them)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.set_defaults(func=_run)


def _variants(specs: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for spec in specs:
        label, sep, text = spec.partition("=")
        try:
            overrides = json.loads(text) if sep else None
        except json.JSONDecodeError as exc:
            raise UsageError(f"--variant {spec!r}: the overrides are not JSON ({exc.msg})") from None
        if not label.strip() or not isinstance(overrides, dict):
            raise UsageError(f"--variant {spec!r}: expected LABEL={{JSON object}}")
        if label.strip() in out:
            raise UsageError(f"--variant: label {label.strip()!r} given twice")
        out[label.strip()] = overrides
    return out


def _run(args: argparse.Namespace) -> int:
    config = SpeedBenchConfig(
        data=args.data, model=args.model, method=args.method, n=args.n, batch_size=args.batch_size,
        reference_n=args.reference_n, hparams=args.hparams, corpus=args.corpus, cache_dir=args.cache_dir, device=args.device,
        threads=args.threads, state_dir=args.state_dir,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), gen_n=args.gen_n,
        variants=_variants(args.variant),
    )
    result = run_speed_bench(config, progress=args.progress)
    text = format_markdown(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        (args.out / "result.md").write_text(text)
        plot_speed(result, args.out / "speed.png")
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else text)
    return 0
