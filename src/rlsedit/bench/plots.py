"""PNG plots of a method benchmark (``results.json`` of :mod:`rlsedit.bench.methods_report`).

* ``metrics_vs_edits.png`` — efficacy, generalization, specificity at each checkpoint (teacher
  forced, top row; with ``retention_first``, the efficacy of the stream's first edits dashed in
  the efficacy panel) and, when the run has them, the generation metrics below them: says it (edit
  prompt; chat dashed), says it on paraphrases / mentions on open rephrases, neighbour
  generation unchanged;
* ``general_vs_edits.png`` — the general suites at each checkpoint (when any were run);
* ``forgetting_curve.png`` — efficacy of each position bin after the whole stream (solid) and
  generation success on the edit prompt of the sampled edits in each bin (dashed);
* ``drift_anchor.png`` — ``‖W − W_0‖_F`` and ``‖K_0ᵀ(W − W_0)‖_F`` (summed in squares over
  layers) after every batch (RQ4);
* ``solve_cost.png`` — cost along the stream: wall seconds per edit of each batch (targets,
  keys, solve, journal; flat means an edit's cost does not grow with history) and the solve's
  seconds alone (RLSEdit's recursion vs MEMIT-seq's re-solve); one series per device when the
  stream moved between devices, without the batches whose targets were replayed from the log;
* ``sweep.png`` — final efficacy/specificity of the RLSEdit sweep points and of RLSEdit at its
  defaults: the first setting that differs on the x axis, one line per combination of the others.

The plots along the stream draw every method and, when the sweep is small
(:data:`MAX_TRACED_SWEEP_POINTS`), its points too, each in one colour across all figures.

Matplotlib runs on the Agg backend; nothing is shown on screen.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

from .timing import timed_batches
from .sweep import SWEEP_METHOD, is_sweep_run, sweep_value_text  # the run names' own spelling

log = logging.getLogger(__name__)

CF_METRICS = (("efficacy", "Efficacy"), ("generalization", "Generalization"), ("specificity", "Specificity"))
# generation panels: (title, [(summary key, line style)]) — rlsedit.eval.generation summaries
GEN_PANELS = (
    ("Says it (edit prompt; chat dashed)", (("edit_begins", "-"), ("chat_mentions", "--"))),
    ("Says it (paraphrase) / mentions (open rephrase)", (("paraphrase_begins", "-"), ("open_mentions", "-"))),
    ("Neighbour generation unchanged", (("neighbour_unchanged", "-"),)),
)
DEVICE_MARKERS = (".", "^", "s", "D")  # solve_cost.png: one per device a stream ran on


def _has_generation(results) -> bool:
    return any("generation" in b["evaluation"] for r in results for b in _checkpoints(r))


def _checkpoints(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in result["batches"] if "evaluation" in b]


def _general_value(name: str, res: dict[str, Any] | None) -> float | None:
    if not res:
        return None
    for key in ("ppl", "acc", "recall", "pass@1"):
        if isinstance(res.get(key), (int, float)):
            return float(res[key])
    return None


MAX_TRACED_SWEEP_POINTS = 3
"""A sweep of at most this many points is drawn along the stream beside the methods (a long
run's one λ > 0 row); a larger grid would crowd those plots and is summed up in ``sweep.png``."""


def _legend_beside(ax, panels) -> None:
    """One legend right of ``ax`` with each label drawn in ``panels`` once (a method or line may be
    missing from a panel), outside the panels so a short curve (a method stopped early) cannot hide
    behind it."""
    by_label: dict[str, Any] = {}
    for panel in panels:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    ax.legend(list(by_label.values()), list(by_label), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def traced_runs(methods: dict[str, Any]) -> dict[str, Any]:
    """The runs drawn along the stream: every method, and the sweep points (``name[...]``) when
    there are at most :data:`MAX_TRACED_SWEEP_POINTS` of them; the order is kept."""
    sweep_points = [name for name in methods if is_sweep_run(name)]
    if len(sweep_points) > MAX_TRACED_SWEEP_POINTS:
        return {name: result for name, result in methods.items() if name not in sweep_points}
    return dict(methods)


def plot_method_bench(full: dict[str, Any], out: str | Path) -> list[Path]:
    """Write the plots listed in the module docstring into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    written: list[Path] = []
    methods = {name: full["methods"][name] for name in full["runs"] if name in full["methods"]}
    if not methods:
        return written
    traced = traced_runs(methods)
    unedited = full.get("unedited")

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # metrics vs number of edits
    with_gen = _has_generation(traced.values())
    fig, grid = plt.subplots(2 if with_gen else 1, 3, figsize=(13, 7.6 if with_gen else 3.8), sharey=True,
                             squeeze=False)
    axes = grid[0]
    colors = {name: f"C{i}" for i, name in enumerate(traced)}
    first_n = full["settings"].get("retention_first", 0)
    for ax, (key, label) in zip(axes, CF_METRICS):
        for name, result in traced.items():
            pts = [(b["edits"], b["evaluation"]["counterfact"]["summary"].get(key)) for b in _checkpoints(result)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[name], label=name)
            if key == "efficacy" and first_n:
                pts = [(b["edits"], (b["evaluation"].get("retention_first") or {}).get("efficacy"))
                       for b in _checkpoints(result)]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="x", ls="--", color=colors[name], label=f"{name} (first {first_n:,})")
        if unedited:
            base = unedited["evaluation"].get("counterfact", {}).get("summary", {}).get(key)
            if base is not None:
                ax.axhline(base, color="grey", ls=":", lw=1, label="unedited")
        ax.axhline(0.5, color="black", ls="--", lw=0.8, label="chance")
        ax.set_title(label)
        ax.set_xlabel("edits applied")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("success rate (teacher-forced)")
    _legend_beside(axes[-1], axes)
    if with_gen:
        for ax, (title, keys) in zip(grid[1], GEN_PANELS):
            for name, result in traced.items():
                for key, style in keys:
                    pts = [(b["edits"], b["evaluation"].get("generation", {}).get("summary", {}).get(key))
                           for b in _checkpoints(result)]
                    pts = [(x, y) for x, y in pts if y is not None]
                    if pts:
                        label = name if key != "chat_mentions" else f"{name} (chat)"
                        ax.plot(*zip(*pts), marker="o", ls=style, color=colors[name], label=label)
            if unedited:
                for key, style in keys:
                    base = unedited["evaluation"].get("generation", {}).get("summary", {}).get(key)
                    if base is not None:
                        ax.axhline(base, color="grey", ls=":", lw=1)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("edits applied")
            ax.set_ylim(-0.02, 1.02)
        grid[1][0].set_ylabel("fraction of generations")
        _legend_beside(grid[1][-1], grid[1])
    save(fig, "metrics_vs_edits.png")

    general = full["settings"].get("general", [])
    if general:
        ncols = min(5, len(general))
        nrows = -(-len(general) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows), squeeze=False)
        for ax in axes.flat[len(general):]:
            ax.set_visible(False)
        for ax, suite in zip(axes.flat, general):
            for name, result in traced.items():
                pts = [(b["edits"], _general_value(suite, b["evaluation"].get("general", {}).get(suite)))
                       for b in _checkpoints(result)]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[name], label=name)
            if unedited:
                res = unedited["evaluation"].get("general", {}).get(suite)
                base = _general_value(suite, res)
                if base is not None:
                    ax.axhline(base, color="grey", ls=":", lw=1, label="unedited")
                if res and suite != "wikitext" and res.get("chance") is not None:
                    ax.axhline(res["chance"], color="black", ls="--", lw=0.8, label="chance")
            if suite == "wikitext":
                ax.set_yscale("log")  # a collapse is orders of magnitude above the unedited level
            ax.set_title("perplexity (WikiText-2)" if suite == "wikitext" else suite)
            ax.set_xlabel("edits applied")
        _legend_beside(axes[0][-1], axes.flat)
        save(fig, "general_vs_edits.png")

    # forgetting curve
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for name, result in traced.items():
        bins = result["final"].get("retention", {}).get("bins", {}).get("success", [])
        pts = [((b["first"] + b["last"]) / 2, b["mean"]) for b in bins if b["mean"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=colors[name], label=name)
        evals = _checkpoints(result)
        gen_bins = evals[-1]["evaluation"].get("generation", {}).get("bins", {}).get("edit_begins", []) if evals else []
        pts = [((b["first"] + b["last"]) / 2, b["mean"]) for b in gen_bins if b["mean"] is not None]
        if pts:
            at = f", at {evals[-1]['edits']:,} edits" if "partial" in result else ""  # its last checkpoint
            ax.plot(*zip(*pts), marker="x", ls="--", color=colors[name],
                    label=f"{name} (says it, generated{at})")
    ax.axhline(0.5, color="black", ls="--", lw=0.8, label="chance (efficacy)")
    ax.set_xlabel("edit position in the stream (0 = oldest)")
    ax.set_ylabel("after the whole stream (or so far)")
    ax.set_ylim(-0.02, 1.02)
    _legend_beside(ax, [ax])
    save(fig, "forgetting_curve.png")

    # drift and anchor residual
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, ax, label in (("drift_fro", axes[0], "‖W − W0‖_F (all edited layers)"),
                           ("anchor_residual", axes[1], "‖K0ᵀ(W − W0)‖_F (all edited layers)")):
        for name, result in traced.items():
            pts = [(b["edits"], b["diagnostics"].get(key)) for b in result["batches"]]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", color=colors[name], label=name)
        ax.set_xlabel("edits applied")
        ax.set_title(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    save(fig, "drift_anchor.png")

    # cost per batch: the whole batch per edit, and the solve alone
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    first_device = full.get("settings", {}).get("device")
    for name, result in traced.items():
        # one series per device (a stream may move between a CPU and a GPU), points only then
        timed = timed_batches(result["batches"], first_device)
        devices = list(dict.fromkeys(device for _, _, device in timed))
        style = "-" if len(devices) < 2 else "none"
        for device, marker in zip(devices, itertools.cycle(DEVICE_MARKERS)):  # the method's colour, a marker per device
            on = [(rec, size) for rec, size, d in timed if d == device]
            label = name if len(devices) < 2 else f"{name} ({device})"
            axes[0].plot([rec["edits"] for rec, _ in on], [rec["total_s"] / size for rec, size in on],
                         marker=marker, linestyle=style, color=colors[name], label=label)
            pts = [(rec["edits"], rec["solve_s"]) for rec, _ in on if rec.get("solve_s") is not None]
            if pts:
                axes[1].plot(*zip(*pts), marker=marker, linestyle=style, color=colors[name], label=label)
    axes[0].set_ylabel("wall seconds per edit (whole batch)")
    axes[1].set_ylabel("solve seconds per batch (all layers)")
    for ax in axes:
        ax.set_xlabel("edits applied")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    save(fig, "solve_cost.png")

    sweep = sweep_points(methods)
    if sweep:
        fig = _sweep_figure(plt, sweep)
        save(fig, "sweep.png")
    return written


def sweep_points(methods: dict[str, Any]) -> dict[str, Any]:
    """The finished sweep points (partial runs lack final scores), led by the swept method at its
    defaults when it has finished and no point already has its settings, so that even a one-point
    sweep is drawn beside what it departs from (and a grid holding the defaults draws them once)."""
    sweep = {name: result for name, result in methods.items() if is_sweep_run(name) and "partial" not in result}
    if not sweep:
        return {}
    defaults = methods.get(SWEEP_METHOD)
    if defaults is None or "partial" in defaults or any(r["config"] == defaults["config"] for r in sweep.values()):
        return sweep
    return {SWEEP_METHOD: defaults, **sweep}


def _sweep_figure(plt, sweep: dict[str, dict[str, Any]]):
    """Final efficacy and specificity of the sweep points: the first setting that differs among
    them on the x axis (in the order run), one line per combination of the others."""
    configs = {name: result["config"] for name, result in sweep.items()}
    keys = [k for k in next(iter(configs.values())) if len({sweep_value_text(c.get(k)) for c in configs.values()}) > 1]
    x_key, line_keys = (keys[0], keys[1:]) if keys else (None, [])
    lines: dict[str, list[tuple[str, float | None, float | None]]] = {}
    for name, result in sweep.items():
        cfg = configs[name]
        evals = _checkpoints(result)
        summary = evals[-1]["evaluation"]["counterfact"]["summary"] if evals else {}
        line = ", ".join(f"{_SHORT.get(k, k)}={_setting_text(cfg.get(k))}" for k in line_keys) or "RLSEdit"
        x = _setting_text(cfg.get(x_key)) if x_key else name
        lines.setdefault(line, []).append((x, summary.get("efficacy"), summary.get("specificity")))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for line, pts in lines.items():
        for ax, index, label in ((axes[0], 1, "efficacy"), (axes[1], 2, "specificity")):
            xy = [(p[0], p[index]) for p in pts if p[index] is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=line)  # categorical x: the values as run
            ax.set_title(f"RLSEdit sweep: {label}")
            ax.set_xlabel(_SHORT.get(x_key, x_key) if x_key else "run")
    axes[0].set_ylabel("success rate (end of stream)")
    axes[0].legend(fontsize=7)
    return fig


_SHORT = {"lambda_reg": "λ", "mu_reg": "μ", "mom2_update_weight": "n"}


def _setting_text(value: Any) -> str:
    """A setting as the sweep figure labels it: ``None`` (left to the hparams file or the model's
    architecture table, as the defaults run leaves ``layers``) reads "default"."""
    return "default" if value is None else sweep_value_text(value)
