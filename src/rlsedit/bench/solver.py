"""Cost of one RLS update against history length, GEMM speed and a MEMIT-seq re-solve.

For each layer size ``(d_k, d_v)`` and batch size ``u`` the benchmark

1. builds an :class:`~rlsedit.solvers.RLSState` from a synthetic full-rank anchor
   (``A = 15000 · XXᵀ/m``, ``X (d_k, m = 2 d_k)`` Gaussian, ``λ = 0``, ``μ = 1`` — the
   public RLSEdit hparams' scale) and drives it with real ``update`` calls to each history
   length (the state after ``n`` keys does not depend on how they were batched, so the
   history is reached in chunks of ``drive_chunk`` keys);
2. times one ``update(K, V)`` of ``u`` keys from each history snapshot, restoring the
   snapshot before every repeat and interleaving the histories (median over repeats); the
   history ratio is the median of the back-to-back ratios ``t_last / t_first`` (paired, so
   a change of machine load during the run cancels), with the ratio of medians beside it;
3. times this run's GEMM rate on the same shapes (``C @ K``, ``d_k×d_k @ d_k×u``, same dtype),
   the periodic ``symmetrize()`` and one :func:`~rlsedit.solvers.memit_seq_solve`;
4. checks the recursion against :func:`~rlsedit.solvers.solve_oneshot` on a small float64
   stream on the same device.

Flop count of one update (``RLSState.update``; multiply-add = 2 flops)::

    4 d_k² u          F = C K  and  C −= H Hᵀ
  + 3 d_k u²          S = Kᵀ F (2 d_k u²), H = F L⁻ᵀ (d_k u²)
  + 4 d_k u d_v       E = V − Kᵀ W, ΔW = H (L⁻¹ E)
  + u³/3 + u² d_v     Cholesky of S, L⁻¹ E
  + 2 d_k u + d_k d_v diagonal check, W += ΔW

The timed update excludes the re-symmetrisation that runs every ``symmetrize_every``
updates; it is timed on its own and reported amortised.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlsedit.errors import InvalidRequestError, UnsupportedError
from rlsedit.model.device import synchronize
from rlsedit.solvers import RLSState, memit_seq_solve, solve_oneshot

log = logging.getLogger(__name__)

# d_k -> d_v of the MLP down projections the benchmark stands for
KNOWN_LAYER_SHAPES: dict[int, int] = {
    1536: 576,  # SmolLM2-135M: intermediate 1536, hidden 576
    2048: 640,  # Gemma 3 270M: intermediate 2048, hidden 640
    14336: 4096,  # Llama 3 8B: intermediate 14336, hidden 4096
}
ANCHOR_SCALE = 15000.0  # mom2_update_weight of the public RLSEdit/MEMIT Llama3-8B hparams
TARGET_RATIO_MAX = 1.10
TARGET_GEMM_FRACTION_MIN = 0.5
TARGET_GEMM_FRACTION_FROM_U = 100


@dataclass(frozen=True)
class SolverBenchConfig:
    """What ``rlsedit bench solver`` measures."""

    dks: tuple[int, ...] = field(default=(1536, 2048), metadata={"help": "key dimensions d_k"})
    dvs: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "value dimension per d_k (default: 576 for 1536, 640 for 2048, 4096 for 14336)"},
    )
    us: tuple[int, ...] = field(default=(1, 100), metadata={"help": "batch sizes u timed"})
    histories: tuple[int, ...] = field(default=(100, 10_000), metadata={"help": "history lengths (keys) timed"})
    repeats: int = field(default=15, metadata={"help": "timed repeats per point (median reported)"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    dtype: str = field(default="float32", metadata={"help": "state dtype: float32 or float64"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    drive_chunk: int = field(default=500, metadata={"help": "keys per update when driving the history"})

    def __post_init__(self) -> None:
        for name in ("dks", "us", "histories"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise InvalidRequestError(f"{name} must be a non-empty list of ints, got {values!r}")
        if any(v < 1 for v in self.dks) or any(v < 1 for v in self.us):
            raise InvalidRequestError(f"dks and us must be >= 1, got dks={self.dks}, us={self.us}")
        if any(h < 0 for h in self.histories) or list(self.histories) != sorted(set(self.histories)):
            raise InvalidRequestError(f"histories must be increasing and >= 0, got {self.histories}")
        if self.dvs is not None:
            if len(self.dvs) != len(self.dks) or any(v < 1 for v in self.dvs):
                raise InvalidRequestError(f"dvs must give one d_v >= 1 per d_k {self.dks}, got {self.dvs}")
        else:
            unknown = [d for d in self.dks if d not in KNOWN_LAYER_SHAPES]
            if unknown:
                raise InvalidRequestError(
                    f"no default d_v for d_k {unknown} (known: {sorted(KNOWN_LAYER_SHAPES)}); pass dvs"
                )
        if self.repeats < 1 or self.drive_chunk < 1:
            raise InvalidRequestError(f"repeats and drive_chunk must be >= 1, got {self.repeats}, {self.drive_chunk}")
        if self.dtype not in ("float32", "float64"):
            raise InvalidRequestError(f"dtype must be float32 or float64, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise InvalidRequestError(f"device {self.device!r} is not a torch device: {exc}") from exc

    def layer_shapes(self) -> list[tuple[int, int]]:
        dvs = self.dvs if self.dvs is not None else tuple(KNOWN_LAYER_SHAPES[d] for d in self.dks)
        return list(zip(self.dks, dvs))


def update_flops(d_k: int, d_v: int, u: int) -> float:
    """Flops of one ``RLSState.update`` (module docstring)."""
    return 4 * d_k**2 * u + 3 * d_k * u**2 + 4 * d_k * u * d_v + u**3 / 3 + u**2 * d_v + 2 * d_k * u + d_k * d_v


def run_solver_bench(config: SolverBenchConfig) -> dict:
    """Run the benchmark; return a JSON-ready dict (``rows`` holds one entry per (d_k, u))."""
    device = torch.device(config.device)
    _require_device(device)
    dtype = getattr(torch, config.dtype)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    started = time.perf_counter()
    rows = []
    for d_k, d_v in config.layer_shapes():
        rows.extend(_bench_layer(config, d_k, d_v, device, dtype, generator))
    errors = _oneshot_check(device, config.seed)
    return {
        "benchmark": "solver",
        "config": asdict(config),
        "machine": machine_description(device),
        "flop_count": "4 d_k^2 u + 3 d_k u^2 + 4 d_k u d_v + u^3/3 + u^2 d_v + 2 d_k u + d_k d_v",
        "targets": {
            "ratio_max": TARGET_RATIO_MAX,
            "gemm_fraction_min": TARGET_GEMM_FRACTION_MIN,
            "gemm_fraction_applies_from_u": TARGET_GEMM_FRACTION_FROM_U,
        },
        "rows": rows,
        **errors,
        "wall_s": time.perf_counter() - started,
    }


def _bench_layer(config, d_k, d_v, device, dtype, generator) -> list[dict]:
    log.info("d_k=%d d_v=%d: building the anchor and driving the history", d_k, d_v)
    m = 2 * d_k
    X = torch.randn(d_k, m, generator=generator, device=device, dtype=dtype)
    # A = n·E[kkᵀ] with E = XXᵀ/m (full rank, cond ≈ 34) and n = ANCHOR_SCALE
    A = (X @ X.mT).mul_(ANCHOR_SCALE / m)
    del X
    W0 = torch.randn(d_k, d_v, generator=generator, device=device, dtype=dtype) / math.sqrt(d_k)
    state = RLSState.from_anchor(W0, A, 0.0, 1.0, dtype=dtype)
    snapshots = {}
    for history in config.histories:
        while state.n_keys_ < history:
            n = min(config.drive_chunk, history - state.n_keys_)
            K = torch.randn(d_k, n, generator=generator, device=device, dtype=dtype)
            state.update(K, torch.randn(n, d_v, generator=generator, device=device, dtype=dtype))
        snapshots[history] = (state.C_.clone(), state.W_.clone(), state.n_keys_)
    work = RLSState(
        state.C_.clone(), state.W_.clone(), state.W0, lam=state.lam, mu=state.mu, jitter=state.jitter,
        symmetrize_every=state.symmetrize_every,
    )
    del state
    G_past = A.mul(1.0 / ANCHOR_SCALE)  # a PSD stand-in for Σ KKᵀ: memit_seq's cost does not depend on it
    symmetrize_s = median_time(work.symmetrize, config.repeats, device)
    rows = []
    for u in config.us:
        K = torch.randn(d_k, u, generator=generator, device=device, dtype=dtype)
        V = torch.randn(u, d_v, generator=generator, device=device, dtype=dtype)
        times = {history: [] for history in config.histories}

        def restore(history: int) -> None:
            C, W, n_keys = snapshots[history]
            work.C_.copy_(C)
            work.W_.copy_(W)
            # n_updates_ = 0: the timed call (the 1st) is not a re-symmetrisation call
            work.n_keys_, work.n_updates_ = n_keys, 0

        restore(config.histories[0])
        work.update(K, V)  # warm-up (library initialisation, kernel selection)
        for repeat in range(config.repeats):
            # interleaved, alternating the order, so drift and load hit every history alike
            order = config.histories if repeat % 2 == 0 else config.histories[::-1]
            for history in order:
                restore(history)
                times[history].append(_time_once(lambda: work.update(K, V), device))
        median = {history: statistics.median(values) for history, values in times.items()}
        first, last = config.histories[0], config.histories[-1]
        # ratio: median over repeats of t_last / t_first measured back to back (paired), which
        # cancels slow changes of machine load; the ratio of the medians is reported as well
        ratio = statistics.median(b / a for a, b in zip(times[first], times[last]))
        C = snapshots[last][0]
        gemm_s = median_time(lambda: C @ K, config.repeats, device)
        W_prev = snapshots[last][1]
        memit_seq_s = median_time(
            lambda: memit_seq_solve(W_prev, A, G_past, K, V), max(3, config.repeats // 3), device
        )
        flops = update_flops(d_k, d_v, u)
        t_update = median[last]
        update_gflops = flops / t_update / 1e9
        gemm_gflops = 2 * d_k**2 * u / gemm_s / 1e9
        row = {
            "d_k": d_k,
            "d_v": d_v,
            "u": u,
            "dtype": config.dtype,
            "t_update_s": {str(h): median[h] for h in config.histories},
            "t_update_min_s": {str(h): min(times[h]) for h in config.histories},
            f"ratio_t{last}_over_t{first}": ratio,
            "ratio_last_over_first": ratio,
            "ratio_of_medians": median[last] / median[first],
            "update_flops": flops,
            "update_gflops": update_gflops,
            "gemm_s": gemm_s,
            "gemm_gflops": gemm_gflops,
            "gemm_fraction": update_gflops / gemm_gflops,
            "symmetrize_s": symmetrize_s,
            "amortized_update_s": t_update + symmetrize_s / max(work.symmetrize_every, 1)
            if work.symmetrize_every
            else t_update,
            "memit_seq_s": memit_seq_s,
            "memit_seq_over_update": memit_seq_s / t_update,
            "ratio_ok": ratio <= TARGET_RATIO_MAX,
            "gemm_fraction_ok": (update_gflops / gemm_gflops >= TARGET_GEMM_FRACTION_MIN)
            if u >= TARGET_GEMM_FRACTION_FROM_U
            else None,
        }
        log.info("d_k=%d u=%d: %s", d_k, u, row)
        rows.append(row)
    return rows


def _oneshot_check(device: torch.device, seed: int) -> dict:
    """Largest relative error of the recursion vs the one-shot solution on small streams."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    d_k, d_v = 48, 8
    worst = {"float64": 0.0, "float32": 0.0}
    for lam, anchor_keys in ((0.0, 3 * d_k), (0.5, d_k // 2)):
        K0 = torch.randn(d_k, anchor_keys, generator=generator, device=device, dtype=torch.float64)
        A = K0 @ K0.mT
        W0 = torch.randn(d_k, d_v, generator=generator, device=device, dtype=torch.float64)
        states = {
            "float64": RLSState.from_anchor(W0, A, lam, 1.0, dtype=torch.float64),
            "float32": RLSState.from_anchor(W0, A, lam, 1.0, dtype=torch.float32),
        }
        Ks, Vs = [], []
        for step in range(20):
            u = 1 + step % 5
            Ks.append(torch.randn(d_k, u, generator=generator, device=device, dtype=torch.float64))
            Vs.append(torch.randn(u, d_v, generator=generator, device=device, dtype=torch.float64))
            for name, state in states.items():
                state.update(Ks[-1], Vs[-1])
                W_ref = solve_oneshot(W0, A, lam, 1.0, Ks, Vs, jitter=state.jitter)
                error = torch.linalg.matrix_norm(state.W_.double() - W_ref) / torch.linalg.matrix_norm(W_ref - W0)
                worst[name] = max(worst[name], float(error))
    return {"max_rel_err_vs_oneshot": worst["float64"], "max_rel_err_vs_oneshot_float32": worst["float32"]}


def machine_description(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _require_device(device: torch.device) -> None:
    if device.type == "cpu":
        return
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError("device 'cuda' was asked for, but torch.cuda.is_available() is False on this machine")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UnsupportedError(f"device {device} cannot allocate tensors here: {exc}") from exc


def _time_once(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_time(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` synchronised calls, after one warm-up."""
    fn()  # warm-up
    return statistics.median(_time_once(fn, device) for _ in range(repeats))


# ---------------------------------------------------------------------- reporting
def format_markdown_table(result: dict) -> str:
    """The rows as a Markdown table (times in milliseconds)."""
    histories = [int(h) for h in result["config"]["histories"]]
    first, last = histories[0], histories[-1]
    head = (
        ["d_k", "d_v", "u"]
        + [f"update @{h} (ms)" for h in histories]
        + [f"t{last}/t{first} paired", f"t{last}/t{first} medians", "update GFLOP/s", "GEMM GFLOP/s", "GEMM fraction", "symmetrize (ms)",
           "MEMIT-seq (ms)", "MEMIT-seq / update"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [str(row["d_k"]), str(row["d_v"]), str(row["u"])]
        cells += [f"{row['t_update_s'][str(h)] * 1e3:.3f}" for h in histories]
        cells += [
            f"{row['ratio_last_over_first']:.3f}",
            f"{row['ratio_of_medians']:.3f}",
            f"{row['update_gflops']:.1f}",
            f"{row['gemm_gflops']:.1f}",
            f"{row['gemm_fraction']:.2f}",
            f"{row['symmetrize_s'] * 1e3:.2f}",
            f"{row['memit_seq_s'] * 1e3:.1f}",
            f"{row['memit_seq_over_update']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_solver_bench(result: dict, path: Path) -> None:
    """Two panels: update time against history; RLS update vs MEMIT-seq re-solve per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = [int(h) for h in result["config"]["histories"]]
    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        times_ms = [row["t_update_s"][str(h)] * 1e3 for h in histories]
        left.plot(histories, times_ms, marker="o", label=f"d_k={row['d_k']}, u={row['u']}")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("history (keys already in the state)")
    left.set_ylabel("one update (ms, median)")
    left.set_title("RLS update cost vs history")
    left.legend(fontsize=8)
    labels = [f"d_k={row['d_k']}\nu={row['u']}" for row in rows]
    positions = range(len(rows))
    width = 0.38
    right.bar([p - width / 2 for p in positions], [row["t_update_s"][str(histories[-1])] * 1e3 for row in rows],
              width, label=f"RLS update @{histories[-1]}")
    right.bar([p + width / 2 for p in positions], [row["memit_seq_s"] * 1e3 for row in rows], width,
              label="MEMIT-seq re-solve")
    right.set_xticks(list(positions), labels, fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("ms (median)")
    right.set_title("per-batch cost: RLS vs MEMIT-seq")
    right.legend(fontsize=8)
    machine = result["machine"]
    where = machine["gpu"] if "gpu" in machine else f"{machine['cpu']}, {machine['torch_threads']} thread(s)"
    fig.suptitle(f"rlsedit bench solver — {where}, {result['config']['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
