"""``rlsedit bench methods`` (also reachable as plain ``rlsedit bench --model …``): the method benchmark.

The same options are added twice: to the ``bench methods`` sub-command, and to the ``bench``
group itself with suppressed defaults, so ``rlsedit bench --model smollm2 --data … --out …``
runs the method benchmark while ``rlsedit bench solver …`` still reaches the solver
benchmark (a sub-command's own values win over the group's).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..errors import InvalidRequestError, UsageError
from . import BENCH_COMMAND, get_bench_subparsers
from .methods import run_method_bench
from .methods_config import MethodBenchConfig, plan_runs
from .methods_report import format_results_markdown, write_report
from .rescore import rescore_generation
from .sweep import parse_sweep, sweep_run_name

_FIELDS = MethodBenchConfig.__dataclass_fields__
_DEFAULTS = MethodBenchConfig()


def _names(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _edit_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated edit counts, e.g. 500,1000,2000, got {text!r}") \
            from None


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "all", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None


def _help(name: str) -> str:
    return _FIELDS[name].metadata["help"]


# (flags, dest, kwargs) — one list for both parsers; "required" ones are checked in _run
_OPTIONS: list[tuple[tuple[str, ...], str, dict]] = [
    (("--model",), "model", {"help": _help("model") + " (required)"}),
    (("--data",), "data", {"help": _help("data") + " (required)"}),
    (("--out",), "out", {"help": "output folder: results.json, results.md, plots, per-method state (required)"}),
    (("--methods",), "methods", {"type": _names, "help": "comma-separated: rlsedit, rlsedit-official, alphaedit, "
                                 "memit, memit-seq, rome, ft (default: " + ",".join(_DEFAULTS.methods) + ")"}),
    (("--n",), "n", {"type": int, "help": _help("n") + f" (default {_DEFAULTS.n})"}),
    (("--batch-size",), "batch_size", {"type": int, "help": _help("batch_size") + f" (default {_DEFAULTS.batch_size})"}),
    (("--checkpoints",), "checkpoints", {"type": int, "help": _help("checkpoints") + f" (default {_DEFAULTS.checkpoints})"}),
    (("--checkpoint-at",), "checkpoint_edits", {"type": _edit_counts, "help": _help("checkpoint_edits")}),
    (("--retention-first",), "retention_first", {"type": int, "help": _help("retention_first")}),
    (("--stop-below-chance",), "stop_below_chance", {"action": "store_true", "help": _help("stop_below_chance")}),
    (("--general",), "general", {"type": _names, "help": "general suites at each checkpoint: ppl, knowns, mmlu, glue, "
                                 "sst2, mrpc, cola, rte, nli, sentiment_analysis, dialogue, glue_mmlu, gsm8k, humaneval"}),
    (("--general-n",), "general_n", {"type": _optional_int, "help": _help("general_n") + f" (default {_DEFAULTS.general_n})"}),
    (("--gsm8k-limit",), "gsm8k_limit", {"type": _optional_int,
                                         "help": _help("gsm8k_limit") + f" (default {_DEFAULTS.gsm8k_limit})"}),
    (("--ppl-tokens",), "ppl_tokens", {"type": int, "help": _help("ppl_tokens") + f" (default {_DEFAULTS.ppl_tokens})"}),
    (("--max-new-tokens",), "max_new_tokens", {"type": _optional_int, "help": _help("max_new_tokens")}),
    (("--fluency-n",), "fluency_n", {"type": int, "help": _help("fluency_n") + f" (default {_DEFAULTS.fluency_n})"}),
    (("--retention-bins",), "retention_bins", {"type": int, "help": _help("retention_bins")}),
    (("--seed",), "seed", {"type": int, "help": _help("seed") + f" (default {_DEFAULTS.seed})"}),
    (("--shuffle",), "shuffle", {"action": "store_true", "help": _help("shuffle")}),
    (("--hparams-dir",), "hparams_dir", {"help": _help("hparams_dir")}),
    (("--sweep",), "sweep", {"help": _help("sweep")}),
    (("--sweep-only",), "sweep_only", {"action": "store_true", "help": _help("sweep_only")}),
    (("--mom2-tokens",), "mom2_tokens", {"type": int, "help": _help("mom2_tokens")}),
    (("--corpus",), "corpus", {"help": _help("corpus")}),
    (("--data-dir",), "data_dir", {"help": _help("data_dir")}),
    (("--device",), "device", {"help": _help("device") + " (default cpu)"}),
    (("--target-rows",), "target_rows", {"type": int,
                                          "help": _help("target_rows") + f" (default {_DEFAULTS.target_rows})"}),
    (("--cache-dir",), "cache_dir", {"help": _help("cache_dir")}),
    (("--eval-batch-size",), "eval_batch_size", {"type": int, "help": _help("eval_batch_size")}),
    (("--gen-n",), "gen_n", {"type": int, "help": _help("gen_n") + f" (default {_DEFAULTS.gen_n})"}),
    (("--gen-max-new-tokens",), "gen_max_new_tokens", {
        "type": int, "help": _help("gen_max_new_tokens") + f" (default {_DEFAULTS.gen_max_new_tokens})"}),
    (("--gen-chat",), "gen_chat", {"choices": ("auto", "yes", "no"),
                                   "help": _help("gen_chat") + f" (default {_DEFAULTS.gen_chat})"}),
    (("--threads",), "threads", {"type": int, "help": "torch intra-op threads (default: torch's choice)"}),
    (("--progress",), "progress", {"action": "store_true", "help": "show progress bars"}),
    (("--json",), "json", {"action": "store_true", "help": "print results.json instead of the Markdown table"}),
    (("--report-only",), "report_only", {"action": "store_true", "help": "run nothing: gather the methods in --out "
                                         "(finished, stopped, or partial: edits done so far and the date) into "
                                         "results.json/results.md/plots (--methods and --sweep runs first, in order, then "
                                         "every other run in --out)"}),
    (("--rescore-generation",), "rescore_generation", {
        "action": "store_true", "help": "edit nothing: re-score the generation metrics of the checkpoints of --out "
        "that sampled fewer edits than min(--gen-n, edits so far), on weights rebuilt from each run's target log "
        "(FT's computed again; checked bit for bit against the checkpoint), then rewrite the report; give the run's own options"}),
    (("--rebuild-tolerance",), "rebuild_tolerance", {
        "type": float, "metavar": "REL", "help": "with --rescore-generation: also accept rebuilt weights that are "
        "not bit for bit the checkpoint's when every edited layer's ||W-W0|| and anchor residual are within REL "
        "(relative) of its progress line's, as when another CPU rebuilds them (float rounding; e.g. 1e-6); the "
        "re-scored checkpoint records the difference"}),
]
_REQUIRED = ("model", "data", "out")
_NOT_CONFIG = {"out", "threads", "progress", "json", "report_only", "rescore_generation", "rebuild_tolerance"}
_DEST_PREFIX = "methods_bench_"  # the group-level copies live under their own names


def _add_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    group = parser.add_argument_group(
        "method benchmark" + (" (the same options as `bench methods`)" if suppress else ""))
    for flags, dest, kwargs in _OPTIONS:
        kw = dict(kwargs)
        kw["dest"] = (_DEST_PREFIX + dest) if suppress else dest
        kw["default"] = argparse.SUPPRESS if suppress else None
        if kw.get("action") != "store_true":
            kw["metavar"] = dest.upper()
        group.add_argument(*flags, **kw)


def register(subparsers: argparse._SubParsersAction) -> None:
    bench_subparsers = get_bench_subparsers(subparsers)
    parser = bench_subparsers.add_parser(
        "methods",
        help="every editor on the same CounterFact stream: quality, retention, drift, cost",
        description=(
            "Streams the first N edits of --data in batches through each method (each on a freshly loaded "
            "model), evaluates at checkpoints, and writes results.json, results.md and PNG plots into --out. "
            "A killed run resumes: finished methods are skipped, a half-finished one continues from its journal."
        ),
    )
    _add_options(parser, suppress=False)
    parser.set_defaults(func=_run_from_methods)
    # plain `rlsedit bench --model …`: the group runs the method benchmark when no sub-command is named
    bench_parser = subparsers.choices[BENCH_COMMAND]
    _add_options(bench_parser, suppress=True)
    bench_subparsers.required = False
    bench_parser.set_defaults(func=_run_from_group)


def _run_from_methods(args: argparse.Namespace) -> int:
    return _run({dest: getattr(args, dest) for _, dest, _ in _OPTIONS})


def _run_from_group(args: argparse.Namespace) -> int:
    given = {dest: getattr(args, _DEST_PREFIX + dest, None) for _, dest, _ in _OPTIONS}
    if all(given[name] is None for name in _REQUIRED) and not given["report_only"]:
        raise UsageError(
            "bench: name a benchmark (`rlsedit bench solver …`, `rlsedit bench methods …`) or give the method "
            "benchmark's --model, --data and --out")
    return _run(given)


def build_config(values: dict) -> MethodBenchConfig:
    """A :class:`MethodBenchConfig` from parsed option values (``None`` = the field's default)."""
    if values.get("checkpoints") is not None and values.get("checkpoint_edits"):
        raise UsageError("bench methods: --checkpoints and --checkpoint-at both say where to evaluate; give one")
    kwargs = {k: v for k, v in values.items() if k not in _NOT_CONFIG and v is not None}
    return MethodBenchConfig(**kwargs)


def _run(values: dict) -> int:
    if values.get("report_only"):
        if values.get("out") is None:
            raise UsageError("bench methods --report-only: missing --out")
        names = None
        if values.get("methods") is not None:
            names = list(values["methods"]) + [sweep_run_name(p) for p in parse_sweep(values.get("sweep"))]
        result = write_report(values["out"], names)
        print(json.dumps(result, indent=2, sort_keys=True) if values.get("json") else format_results_markdown(result))
        return 0
    if values.get("rebuild_tolerance") is not None and not values.get("rescore_generation"):
        raise UsageError("bench methods: --rebuild-tolerance applies only with --rescore-generation")
    missing = [f"--{name}" for name in _REQUIRED if values.get(name) is None]
    if missing:
        raise UsageError(f"bench methods: missing {', '.join(missing)}")
    if values.get("threads") is not None:
        if values["threads"] < 1:
            raise InvalidRequestError(f"--threads must be >= 1, got {values['threads']}")
        torch.set_num_threads(values["threads"])
    config = build_config(values)
    if values.get("rescore_generation"):
        rescored = rescore_generation(config, values["out"], progress=bool(values.get("progress")),
                                      tolerance=values.get("rebuild_tolerance"))
        for name, checkpoints in rescored.items():
            for c in checkpoints:
                match = ("bit for bit" if c["weights"]["identical"]
                         else f"within {c['weights']['layer_rel_diff']:.1e} relative")
                print(f"{name}: {c['edits']:,} edits: sampled {c['before']['generation_edits']} -> "
                      f"{c['after']['generation_edits']} edits (first edits: {c['before']['first_generation_edits']} -> "
                      f"{c['after']['first_generation_edits']}; rebuilt weights {match})", file=sys.stderr)
        result = write_report(values["out"], [run.name for run in plan_runs(config)])
        print(json.dumps(result, indent=2, sort_keys=True) if values.get("json") else format_results_markdown(result))
        return 0
    result = run_method_bench(config, values["out"], progress=bool(values.get("progress")))
    if values.get("json"):
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_results_markdown(result))
        print(f"wrote {values['out']}/results.json, results.md and plots", file=sys.stderr)
    return 0
