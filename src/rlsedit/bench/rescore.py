"""Re-scoring the generation metrics of checkpoints that sampled fewer edits than the run's plan
asks (``rlsedit bench methods --rescore-generation``).

A checkpoint after ``E`` edits scores generation on ``min(gen_n, E)`` of them
(:meth:`~rlsedit.bench.methods_eval.GenerationPlan.at`); a run evaluated under an earlier rule (one
fixed sample of ``gen_n`` over the whole stream: 24 of the first 500 edits of a 10,000-edit stream)
has checkpoints with fewer. For each such checkpoint this rebuilds the method's weights in a
scratch session from its target log (no optimisation: the logged value targets are replayed, keys
recomputed; FT, which logs none, computes its batches again), refuses unless they match the
checkpoint's recorded ``edited_weights_sha256`` bit for bit, and scores the generation metrics (and
*says it* on the first edits) again. Another CPU rebuilds the same weights only up to float
rounding (its BLAS kernels sum in another order); ``tolerance`` accepts those when every edited
layer's ``‖W−W0‖`` and anchor residual are within it (relative) of the progress line's, and the
rescored checkpoint records the difference. Teacher-forced figures (the first edits' efficacy among
them) and timings are kept; the rescored evaluation records ``generation_rescored`` (when, by which
code, the sample sizes it replaced, and how the rebuilt weights matched). Progress lines are
rewritten after each checkpoint, so a stop keeps what was done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..editors import get_editor_class
from ..editors.base import iter_batches
from ..errors import InvalidRequestError, StateMismatchError
from .edit_stream import select_edits
from .methods import TARGETS_DIR, bench_machine, rebuild_batch, rebuildable
from .methods_config import MethodBenchConfig, MethodRun, plan_runs
from .methods_eval import RunScoring, evaluate_generation_sample, retention_of_first
from .provenance import code_description
from .resume import (SETTINGS_FILE, bench_settings, check_or_write_settings, read_progress, rewrite_progress,
                     write_json)
from .target_log import TargetLog
from .unedited_row import generation_plan_with_pre_edit

log = logging.getLogger(__name__)


def stale_checkpoints(records: list[dict[str, Any]], scoring: RunScoring) -> list[int]:
    """The batches whose checkpoint scored generation (or the first edits' *says it*) on fewer
    sampled edits than ``scoring``'s plan asks now."""
    config, plan = scoring.config, scoring.plan
    stale = []
    for rec in records:
        ev = rec.get("evaluation")
        if not ev:
            continue
        gen = (ev.get("generation") or {}).get("counts", {}).get("edits", 0)
        short = gen < len(plan.at(rec["edits"]))
        if config.retention_first:
            first = min(rec["edits"], config.retention_first)
            said = ((ev.get("retention_first") or {}).get("generation") or {}).get("edits", 0)
            short = short or said < min(config.gen_n, first)
        if short:
            stale.append(rec["batch"])
    return stale


def rescore_generation(config: MethodBenchConfig, out: str | Path, *, progress: bool = False,
                       tolerance: float | None = None) -> dict[str, Any]:
    """Re-score every stale checkpoint of the runs of ``config`` in ``out``; returns, per run, the
    batches re-scored with the sample sizes before and after. ``tolerance`` (relative; ``None``:
    bit for bit) accepts rebuilt weights that differ from the checkpoint's by float rounding."""
    from ..eval.runner import general_suite_names
    from ..session.session import Runtime

    out = Path(out)
    if not (out / SETTINGS_FILE).is_file():
        raise InvalidRequestError(f"{out} holds no method benchmark ({SETTINGS_FILE} is missing); nothing to re-score")
    if tolerance is not None and not 0 <= tolerance < 1e-3:
        raise InvalidRequestError(f"the rebuild tolerance must be in [0, 1e-3) (float rounding), got {tolerance}")
    if not config.gen_n:
        raise InvalidRequestError("--rescore-generation needs the run's --gen-n (generation metrics are off)")
    code = code_description()  # the commit this process runs, before HEAD can move under it
    general = general_suite_names(config.general)
    runs = plan_runs(config)
    requests = select_edits(config.data, config.n, shuffle=config.shuffle, seed=config.seed)
    check_or_write_settings(out, bench_settings(config, requests, general))  # refuses other settings
    scoring = RunScoring(config, tuple(general), generation_plan_with_pre_edit(out, config, requests))
    runtime = Runtime(device=config.device, progress=progress, cache_dir=config.cache_dir, corpus=config.corpus,
                      target_rows=config.target_rows)
    summary: dict[str, Any] = {}
    for run in runs:
        folder = out / run.dir_name
        records = read_progress(folder / "progress.jsonl")
        stale = stale_checkpoints(records, scoring)
        if stale:
            summary[run.name] = _rescore_run(run, scoring, requests, folder, runtime, records, stale, tolerance,
                                            code)
        else:
            summary[run.name] = []
            log.info("%s: every checkpoint already scored its full sample", run.name)
    return summary


def _rescore_run(run: MethodRun, scoring: RunScoring, requests, folder: Path, runtime, records: list[dict[str, Any]],
                 stale: list[int], tolerance: float | None, code: dict[str, Any]) -> list[dict[str, Any]]:
    from ..filelock import StateLock
    from ..session.session import Session
    from ..session.store import is_state_dir

    config = scoring.config
    by_batch = {rec["batch"]: rec for rec in records}
    batches = list(iter_batches(requests, config.batch_size))
    editor_class = get_editor_class(run.method)
    target_log = TargetLog(folder / TARGETS_DIR) if editor_class.logs_value_targets else None
    for b in range(1, max(stale) + 1):
        if not rebuildable(target_log, editor_class, batches[b - 1]):
            raise StateMismatchError(f"{run.name}: batch {b} is not in the target log {folder / TARGETS_DIR}; "
                                     "its checkpoints cannot be rebuilt without optimising again")
    state = folder / "state"
    # a bench editing this run holds its session's lock: refuse rather than rewrite its progress under it
    lock = StateLock(state) if is_state_dir(state) else contextlib.nullcontext()
    done: list[dict[str, Any]] = []
    with lock, tempfile.TemporaryDirectory(prefix="rlsedit-rescore-") as scratch:
        session = Session.create(Path(scratch) / "state", model=config.model, method=run.method, config=run.config,
                                 runtime=runtime)
        try:
            session.editor.target_log = target_log
            for b in range(1, max(stale) + 1):
                rebuilt = rebuild_batch(session, batches[b - 1], b, by_batch.get(b, {}))
                if b not in stale:
                    continue
                rec = by_batch[b]
                weights = _rebuilt_match(run.name, b, rebuilt, tolerance)
                done.append(_rescore_checkpoint(session.lm, rec, batches[:b], scoring, weights, code))
                rewrite_progress(folder / "progress.jsonl", records)
                log.info("%s: batch %d re-scored (%s)", run.name, b, done[-1])
        finally:
            session.close(snapshot=False)
    result_path = folder / "result.json"
    if result_path.is_file():  # a finished run's result holds the same lines
        result = json.loads(result_path.read_text())
        result["batches"] = sorted(records, key=lambda r: r["batch"])
        write_json(result_path, result)
    return done


def _rebuilt_match(name: str, b: int, rebuilt: dict[str, Any], tolerance: float | None) -> dict[str, Any]:
    """How the weights rebuilt at batch ``b`` match its checkpoint; raises unless bit for bit, or
    within ``tolerance`` on every layer's drift and anchor residual."""
    if rebuilt.get("identical") is True:
        return {"identical": True}
    diff = rebuilt.get("layer_rel_diff")
    if tolerance is not None and rebuilt.get("identical") is False and diff is not None and diff <= tolerance:
        return {"identical": False, "layer_rel_diff": diff, "tolerance": tolerance}
    measured = ("" if diff is None else
                f"; the largest relative difference of a layer's drift or anchor residual is {diff:.2e}")
    raise StateMismatchError(
        f"{name}: the weights rebuilt at batch {b} are not the checkpoint's (its edited_weights_sha256{measured}); "
        "its generation is not re-scored"
        + ("" if tolerance is not None else " (a rebuild on another CPU differs by float rounding: "
           "--rebuild-tolerance accepts that)"))


def _rescore_checkpoint(lm, rec: dict[str, Any], batches, scoring: RunScoring, weights: dict[str, Any],
                        code: dict[str, Any]) -> dict[str, Any]:
    config, plan = scoring.config, scoring.plan
    so_far = [r for batch in batches for r in batch]
    ev = rec["evaluation"]
    before = {"generation_edits": ((ev.get("generation") or {}).get("counts") or {}).get("edits", 0),
              "first_generation_edits": (((ev.get("retention_first") or {}).get("generation") or {})
                                         .get("edits", 0))}
    ev["generation"] = evaluate_generation_sample(lm, so_far, plan, config.retention_bins)
    if config.retention_first:
        # the weights are the checkpoint's (bit for bit, or to float rounding): its efficacy stands
        recorded = (ev.get("retention_first") or {}).get("efficacy")
        ev["retention_first"] = retention_of_first(lm, so_far, config, plan, efficacy=recorded)
    after = {"generation_edits": ev["generation"]["counts"]["edits"],
             "first_generation_edits": ((ev.get("retention_first") or {}).get("generation") or {}).get("edits", 0)}
    ev["generation_rescored"] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "code": code, "machine": bench_machine(config), "before": before,
                                 "weights": weights}
    return {"batch": rec["batch"], "edits": rec["edits"], "before": before, "after": after, "weights": weights}
