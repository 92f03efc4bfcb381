"""``rlsedit stats``: compute (or read from the cache) the corpus second moments of some layers.

Prints, per layer: token count, trace of ``E[k kᵀ]``, numerical rank, condition number,
whether it came from the cache, and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import math

from ..errors import InvalidRequestError
from .corpus import corpus_label, resolve_corpus
from .moment import spectrum_summary
from .stats import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, collect_second_moments


def parse_layers(text: str) -> list[int]:
    """``"3,4,5"`` or ``"3-7"`` (inclusive) or a mix, as a list of layer indices."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                layers.extend(range(first, last + 1))
            elif part:
                layers.append(int(part))
    except ValueError:
        raise InvalidRequestError(f"--layers {text!r}: expected comma-separated integers or ranges like 3-7") from None
    if not layers:
        raise InvalidRequestError(f"--layers {text!r} names no layer")
    return layers


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="corpus second moments E[kkᵀ] of the edited layers' keys (cached)",
        description="Compute or load the uncentered second moment E[kkᵀ] of the MLP "
                    "down-projection input over a corpus, for the given layers.",
    )
    parser.add_argument("--model", default="smollm2",
                        help="model spec: smollm2, gemma3-270m, a .gguf file or a local HF directory")
    parser.add_argument("--corpus", default=None,
                        help='corpus: .jsonl with a "text" field per line, or a plain-text file '
                             '(default: the Wikipedia sample bundled with the package)')
    parser.add_argument("--layers", default=None,
                        help="layers, e.g. 3,4,5 or 3-7 (default: the model's edit layers)")
    parser.add_argument("--mom2-tokens", "--max-tokens", dest="max_tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"corpus tokens for E[kkᵀ] (default {DEFAULT_MAX_TOKENS}; --max-tokens is the old name)")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help=f"padded tokens per forward pass (default {DEFAULT_BATCH_TOKENS})")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"length of the pieces documents are cut into "
                             f"(default {DEFAULT_SEQ_LEN}, or the context length if shorter)")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: ~/.cache/rlsedit)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..model.load import load_model

    corpus = resolve_corpus(args.corpus)  # fail before the model loads
    lm = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    layers = parse_layers(args.layers) if args.layers else list(lm.default_layers())
    results = collect_second_moments(
        lm, layers, corpus, max_tokens=args.max_tokens, batch_tokens=args.batch_tokens,
        seq_len=args.seq_len, cache_dir=args.cache_dir, use_cache=not args.no_cache,
        progress=args.progress,
    )
    rows = []
    for layer, result in results.items():
        row = {"layer": layer, **spectrum_summary(result.moment), "cached": result.cached,
               "seconds": round(result.seconds, 3),
               "path": None if result.path is None else str(result.path)}
        rows.append(row)
    if args.json:
        for row in rows:  # JSON has no infinity
            if math.isinf(row["condition"]):
                row["condition"] = None
        print(json.dumps({"model": lm.spec, "fingerprint": lm.fingerprint, "corpus": corpus_label(args.corpus),
                          "max_tokens": args.max_tokens, "layers": rows}, indent=2, sort_keys=True))
        return 0
    print(f"model {lm.spec} ({lm.name}), d_k = {lm.d_k}, corpus {corpus_label(args.corpus)}")
    print(f"{'layer':>5} {'tokens':>8} {'trace':>12} {'rank':>6} {'condition':>11} {'cached':>6} {'seconds':>8}")
    for row in rows:
        print(f"{row['layer']:>5} {row['count']:>8} {row['trace']:>12.5g} {row['rank']:>6} "
              f"{row['condition']:>11.4g} {'yes' if row['cached'] else 'no':>6} {row['seconds']:>8.2f}")
    return 0
