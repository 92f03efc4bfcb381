"""The method benchmark: every editor on the same stream of CounterFact edits.

What one run does (``rlsedit bench methods``, or plain ``rlsedit bench --model …``):

1. **Edits.** The first ``n`` records of the data file, in file order (``shuffle=True``:
   those ``n`` records in a seeded random order). Every method gets the same sequence,
   cut into consecutive batches of ``batch_size``.
2. **Unedited reference.** The base model is scored once on the same edits and general
   suites (row ``unedited``): what editing starts from. Methods run as separate processes
   on one ``out`` share it: the first scores it under a lock on ``out``, the others wait.
   ``unedited.json`` is written in stages, so a stop while it is scored (hours at 10,000
   edits on a CPU) loses little (:mod:`rlsedit.bench.unedited_row`).
3. **Per method**, on a freshly loaded model (each method's
   :class:`~rlsedit.session.session.Session` loads the model itself; before the first batch
   the weights' sha256 is checked against the base model's, so nothing leaks between
   methods): the batches are applied through the session (journaled, so a killed run
   resumes mid-method), and after each batch the bench records

   * timings — ``total_s`` (the whole batch: validation, targets, keys, solve, journal),
     ``solve_s`` (the method's closed-form solve, summed over layers; ``None`` for FT, which
     has none), ``journal_s`` (durable write) and ``locate_s = total − solve − journal``
     (value targets and keys);
   * diagnostics — per layer ``drift_fro = ‖W − W_0‖_F`` and
     ``anchor_residual = ‖K_0ᵀ(W − W_0)‖_F = sqrt(n · tr(Dᵀ E[kkᵀ] D))`` (RQ4);
   * at ``checkpoints`` evenly spaced batches, or at the first batch reaching each of
     ``checkpoint_edits`` (always the last): CounterFact efficacy / generalization /
     specificity on the edits applied so far, EasyEdit's locality (argmax agreement with the
     unedited model on the neighbourhood answers, whose argmaxes the unedited row records
     once: ``unedited.json`` ``locality_pre_edit``), the chosen general suites, with
     ``retention_first`` the efficacy of the stream's first edits, and with
     ``stop_below_chance`` the efficacy of the batch just applied: a method whose last-batch
     efficacy is below chance at two consecutive checkpoints stops editing there
     (:func:`~rlsedit.bench.edit_stream.collapse_stop`; its result records ``stopped``).

   After the last batch: the forgetting curve (:func:`rlsedit.eval.retention.forgetting_curve`)
   and, on the first ``fluency_n`` edits, fluency and consistency (these generate text,
   the slowest part of the evaluation).
4. **Shared work.** The key second moments ``E[kkᵀ]`` come from
   :func:`rlsedit.locate.stats.second_moments`, cached on disk: the first method computes
   them, the others read the cache (or wait for it, when they run at the same time).
   Context prefixes are seeded, so every method computes the same ones from its unedited
   model.

Resumability (files under ``out``): ``settings.json`` pins the edit stream (ids) and
everything that changes results; ``<method>/state`` is the session; ``<method>/progress.jsonl``
holds one line per finished batch (timings, diagnostics, checkpoint scores, UTC time);
``<method>/result.json`` is written atomically when the method is done (or stopped). A rerun skips
finished methods, reopens a half-finished one from its journal and continues with the
next batch; a method whose progress lines already meet the collapse stop is not edited
further (batch granularity: a batch that was journaled but whose progress line was
lost keeps its edits; its timings are recorded as ``None``). A half-finished method whose
session is gone (a new machine gets only the committed files) rebuilds its finished batches
from ``<method>/targets/`` (the value targets it logged), or, for FT, which logs none, by
computing them again, compares each with its progress line, and continues. A checkpoint's
CounterFact records are appended to ``<method>/checkpoint-counterfact.jsonl`` a part at a time
while they are scored (:mod:`rlsedit.bench.counterfact_parts`): a stop in the middle keeps them
for a restart that reaches the same edited weights bit for bit (the same CPU replaying the same
targets); the file goes once the batch's progress line is written.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..editors.base import iter_batches
from ..errors import InvalidRequestError, StateMismatchError
from ..requests import EditRequest
from .edit_stream import checkpoint_plan, collapse_stop, select_edits
from .methods_config import MethodBenchConfig, MethodRun, plan_runs
from .methods_eval import RunScoring, consistency_reference, diagnostics_summary, last_batch_efficacy
from .methods_report import write_report
from .provenance import code_description
from .target_log import TargetLog
from .resume import (append_progress, bench_settings, check_or_write_settings, read_progress, rewrite_progress,
                     write_json, write_run_name)
from .timing import timing_summary
from .unedited_row import unedited_row

log = logging.getLogger(__name__)

TARGETS_DIR = "targets"  # <method>/targets/: the target log a resumed run rebuilds lost batches from
CHECKPOINT_PARTS_FILE = "checkpoint-counterfact.jsonl"  # <method>/: a checkpoint's CounterFact records while scored


class _PhaseTimer:
    """Adds up the wall time of the editor's ``_solve`` and the journal's ``append`` calls.

    Installed as instance attributes on this run's own editor and store, so nothing global
    changes; :meth:`take` returns and resets the sums.
    """

    def __init__(self, editor, store) -> None:
        self.solve_s = 0.0
        self.solve_calls = 0
        self.journal_s = 0.0
        self._wrap(editor, "_solve", "solve")
        self._wrap(store, "append", "journal")

    def _wrap(self, obj, attr: str, phase: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                if phase == "solve":
                    self.solve_s += elapsed
                    self.solve_calls += 1
                else:
                    self.journal_s += elapsed

        setattr(obj, attr, timed)

    def take(self) -> tuple[float | None, float]:
        solve = self.solve_s if self.solve_calls else None
        journal = self.journal_s
        self.solve_s, self.solve_calls, self.journal_s = 0.0, 0, 0.0
        return solve, journal


def run_method_bench(config: MethodBenchConfig, out: str | Path, *, progress: bool = False,
                     on_method_done: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out``; returns the full results dict (also in
    ``out/results.json``, with ``results.md`` and PNG plots beside it)."""
    from ..eval.runner import general_suite_names
    from ..eval.zsre import is_mend_zsre_file
    from ..session.session import Runtime
    if not config.data:
        raise InvalidRequestError("data: pass the edit file (--data FILE, e.g. a CounterFact JSON)")
    if is_mend_zsre_file(config.data):
        # scored as CounterFact, a zsRE file would give zsRE numbers under no named convention
        raise InvalidRequestError(
            f"data: {config.data} holds MEND zsRE records, but the method benchmark scores CounterFact; "
            "evaluate zsRE with `rlsedit eval --suites zsre --zsre-convention memit|easyedit`")
    # the commit this process runs, read before any long work: HEAD may move while it edits
    code = code_description()
    general = general_suite_names(config.general)
    runs = plan_runs(config)  # checks methods, hparams files and the sweep before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    requests = select_edits(config.data, config.n, shuffle=config.shuffle, seed=config.seed)
    first_device = check_or_write_settings(out, bench_settings(config, requests, general))["device"]
    runtime = Runtime(device=config.device, progress=progress, cache_dir=config.cache_dir,
                      corpus=config.corpus, target_rows=config.target_rows)
    consistency_ref = None
    if config.fluency_n:
        consistency_ref = consistency_reference(config, requests)

    unedited, scoring = unedited_row(out, config, requests, general, consistency_ref)
    base_sha = unedited["weights_sha256"]

    results: dict[str, Any] = {}
    for run in runs:
        result_path = out / run.dir_name / "result.json"
        if result_path.is_file():
            log.info("%s: already done (%s)", run.name, result_path)
            results[run.name] = json.loads(result_path.read_text())
            continue
        results[run.name] = _run_one(run, scoring, requests, out / run.dir_name, runtime, base_sha, code,
                                     first_device=first_device)
        write_json(result_path, results[run.name])
        if on_method_done is not None:
            on_method_done(run.name, results[run.name])
    return write_report(out, [r.name for r in runs], machine=bench_machine(config))


def target_steps_summary(steps: list[int] | None, max_steps: int | None) -> dict[str, Any]:
    """``target_steps_mean`` (Adam steps per edit of a batch) and ``target_steps_capped`` (its
    requests that used every step: ``max_steps − 1``, the last evaluation takes none); empty for
    a method without value targets."""
    if not steps:
        return {}
    out: dict[str, Any] = {"target_steps_mean": sum(steps) / len(steps)}
    if max_steps is not None:
        out["target_steps_capped"] = sum(s >= max_steps - 1 for s in steps)
    return out


def bench_machine(config: MethodBenchConfig) -> dict[str, Any]:
    """The device, CPU, torch version, thread count and rows per target pass this process
    benchmarks on."""
    import torch

    from .solver import machine_description

    return machine_description(torch.device(config.device)) | {"torch_threads": torch.get_num_threads(),
                                                                "target_rows": config.target_rows}


def _score_checkpoint(lm, batches: list[list[EditRequest]], record: dict[str, Any], scoring: RunScoring,
                      parts_path: Path, *, records_out: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The checkpoint evaluation of the weights after ``batches`` (all applied so far; ``record`` is
    the last one's progress line). CounterFact is scored in parts kept on disk: a stop in an
    hours-long checkpoint keeps what was scored, for a restart whose weights are these bit for bit."""
    so_far = [r for batch in batches for r in batch]
    evaluation = scoring.checkpoint(
        lm, so_far, parts_path, {"batch": record["batch"], "edited_weights_sha256": record["edited_weights_sha256"]},
        records_out=records_out)
    if scoring.config.stop_below_chance:
        evaluation["last_batch_efficacy"] = last_batch_efficacy(lm, batches[-1], scoring.config)
    return evaluation


def _timed_record(run: MethodRun, session, b: int, edits: int, total: float | None,
                  phases: tuple[float | None, float]) -> dict[str, Any]:
    """Batch ``b``'s progress line so far: its edit count and where its ``total`` seconds went
    (``phases``: solve and journal seconds, :meth:`_PhaseTimer.take`); ``total`` is ``None`` for
    a batch journaled before a crash, whose timings were lost."""
    record: dict[str, Any] = {"batch": b, "edits": edits}
    if total is None:
        return record | {"total_s": None, "solve_s": None, "journal_s": None, "locate_s": None, "resumed": True}
    solve_s, journal_s = phases
    record.update(total_s=total, solve_s=solve_s, journal_s=journal_s, locate_s=total - (solve_s or 0.0) - journal_s)
    info = session.store.read_entry(session.store.journal_count - 1).meta.get("info", {})
    record.update(target_steps_summary(info.get("target_steps"), getattr(run.config, "v_num_grad_steps", None)))
    if info.get("targets_replayed"):  # from the target log: this batch timed no optimisation
        record["targets_replayed"] = True
    elif info.get("targets_replayed_edits"):  # ROME resumed mid-batch: some requests were not timed
        record["targets_replayed_edits"] = info["targets_replayed_edits"]
    return record


def _run_one(run: MethodRun, scoring: RunScoring, requests: list[EditRequest], folder: Path, runtime,
             base_sha: str, code: dict[str, Any], *, first_device: str | None = None) -> dict[str, Any]:
    from ..model.weights import weights_sha256
    from ..session.session import Session
    from ..session.store import is_state_dir

    config = scoring.config
    folder.mkdir(parents=True, exist_ok=True)
    write_run_name(folder, run.name)
    state_dir = folder / "state"
    progress_path = folder / "progress.jsonl"
    parts_path = folder / CHECKPOINT_PARTS_FILE
    if state_dir.exists() and not is_state_dir(state_dir):
        # a crash while the session was being created: nothing in it was acknowledged
        log.warning("%s: removing an unfinished state folder %s", run.name, state_dir)
        shutil.rmtree(state_dir)
    records = read_progress(progress_path)
    start_wall = time.perf_counter()
    setup_start = time.perf_counter()
    session = Session.open_or_create(state_dir, model=config.model, method=run.method, config=run.config,
                                     runtime=runtime)
    setup_s = time.perf_counter() - setup_start
    try:
        if session.store.meta["config"] != run.config.to_dict():
            raise StateMismatchError(f"{state_dir} holds another configuration of {run.method}; delete it to redo")
        if not session.index:
            sha = weights_sha256(session.lm)
            if sha != base_sha:
                raise StateMismatchError(
                    f"{run.name}: the freshly loaded model's weights ({sha[:12]}…) differ from the base model's "
                    f"({base_sha[:12]}…); refusing to benchmark on changed weights")
        timer = _PhaseTimer(session.editor, session.store)
        batches = list(iter_batches(requests, config.batch_size))
        checkpoints = checkpoint_plan(len(requests), config.batch_size, config.checkpoints, config.checkpoint_edits)
        target_log = TargetLog(folder / TARGETS_DIR) if session.editor.logs_value_targets else None
        session.editor.target_log = target_log

        records = _kept_progress(run.name, records, batches, session, target_log, progress_path)
        done = {rec["batch"]: rec for rec in records}
        ran_on = {"code": code, "machine": bench_machine(config)}  # written on each new progress line
        rebuilt: list[dict[str, Any]] = []
        rebuilt_noted = False
        last_records: list[dict[str, Any]] | None = None
        stopped = collapse_stop(records) if config.stop_below_chance else None
        for b, batch in enumerate(batches, start=1):
            if stopped is not None:
                log.info("%s: stopped at %d edits (%s)", run.name, stopped["at_edits"], stopped["reason"])
                break
            if b in done:
                if not _journaled(session, batch):  # lost with its session: rebuilt from its logged targets
                    rebuilt.append(rebuild_batch(session, batch, b, done[b]))
                    timer.take()
                continue
            applied_before = _journaled(session, batch)
            start = time.perf_counter()
            if not applied_before:
                report = session.edit(batch, batch_size=len(batch))
                if len(report.applied) != len(batch):
                    raise StateMismatchError(f"{run.name}: batch {b} applied {len(report.applied)} of {len(batch)} edits")
            total = time.perf_counter() - start
            edits = min(b * config.batch_size, len(requests))  # the last batch may be short
            record = _timed_record(run, session, b, edits, None if applied_before else total, timer.take())
            record["diagnostics"] = diagnostics_summary(session.editor.diagnostics())
            record["edited_weights_sha256"] = edited_weights_sha256(session.lm, session.editor.layers)
            if b in checkpoints:
                if checkpoints[b]:
                    record["checkpoint_for"] = checkpoints[b]  # the edit counts asked; "edits" is the actual one
                last_records = [] if b == len(batches) else None  # the forgetting curve reads them
                record["evaluation"] = _score_checkpoint(session.lm, batches[:b], record, scoring, parts_path,
                                                         records_out=last_records)
            record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            record.update(ran_on)
            if rebuilt and not rebuilt_noted:
                # the weights this batch started from were rebuilt in this process: the line says how
                # they matched the first run (another CPU rebuilds them only to float rounding)
                record["rebuilt_before"] = rebuilt_summary(rebuilt)
                rebuilt_noted = True
            append_progress(progress_path, record)
            parts_path.unlink(missing_ok=True)  # in the progress line now
            records.append(record)
            if config.stop_below_chance:
                stopped = collapse_stop(records)
            log.info("%s: batch %d/%d (%.1f s)", run.name, b, len(batches), total)
        records.sort(key=lambda r: r["batch"])
        applied = requests[:stopped["at_edits"]] if stopped is not None else requests
        # the last batch's checkpoint scored exactly these on these weights, unless it ran in an
        # earlier process (a resumed run) or the method stopped early
        reuse = last_records if last_records and len(last_records) == len(applied) else None
        final = scoring.final(session.lm, applied, records=reuse)
        status = {"weights_sha256": weights_sha256(session.lm), "layers": list(session.editor.layers),
                  "edits_applied": len(session.index)}
    finally:
        session.close()
    return {
        "method": run.method,
        "machine": ran_on["machine"],
        "config": run.config.to_dict(),
        "batches": records,
        "final": final,
        "status": status,
        "stopped": stopped,
        "rebuilt_batches": rebuilt_summary(rebuilt),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **timing_summary(records, first_device),
        "setup_seconds_last_open": setup_s,
        "wall_seconds_this_process": time.perf_counter() - start_wall,
    }


def _journaled(session, batch: list[EditRequest]) -> bool:
    """Whether every edit of ``batch`` is in ``session``'s journal."""
    return all(r.id in session.index for r in batch)


def _kept_progress(name: str, records: list[dict[str, Any]], batches: list[list[EditRequest]], session,
                   target_log: TargetLog | None, progress_path: Path) -> list[dict[str, Any]]:
    """The progress lines a resumed run may skip past: those whose batch is in the journal or can be
    rebuilt, from the target log or (a method that logs no targets, ``target_log`` ``None``) by
    computing it again. A state folder lost while progress.jsonl stayed (another machine) must not
    make the run skip unapplied batches; the lines dropped are rewritten out of ``progress_path``."""
    def counts(b: int) -> bool:
        batch = batches[b - 1]
        return _journaled(session, batch) or rebuildable(target_log, session.editor, batch)

    kept = [rec for rec in records if 1 <= rec["batch"] <= len(batches) and counts(rec["batch"])]
    if len(kept) != len(records):
        log.warning("%s: %d progress lines have no journaled or logged batch; redoing those batches",
                    name, len(records) - len(kept))
        rewrite_progress(progress_path, kept)
    return kept


def edited_weights_sha256(lm, layers) -> str:
    """sha256 of the edited layers' weights (float32, in layer order): what a batch left behind."""
    import hashlib

    from ..model.weights import get_W

    digest = hashlib.sha256()
    for l in layers:
        digest.update(get_W(lm, l).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def rebuildable(target_log: TargetLog | None, editor, batch: list[EditRequest]) -> bool:
    """Whether :func:`rebuild_batch` can apply ``batch`` again without optimising its value targets:
    every entry ``editor`` (an editor or its class) logs for it is in ``target_log``, or the method
    logs none (``target_log`` ``None``: FT computes its batches again)."""
    return target_log is None or target_log.has_batch(editor, batch)


def rebuild_batch(session, batch: list[EditRequest], b: int, record: dict[str, Any]) -> dict[str, Any]:
    """Apply batch ``b`` again, from its logged targets (no optimisation) or, for a method that
    logs none (FT), by computing it again, and compare what it left with its progress line: the
    weights' digest (bit for bit, ``identical``), the total drift (``drift_rel_diff``) and, per
    layer, ``‖W−W0‖`` and the anchor residual (``layer_rel_diff``, the largest relative difference
    of any of them: float rounding when another CPU rebuilt it)."""
    start = time.perf_counter()
    report = session.edit(batch, batch_size=len(batch))
    if len(report.applied) != len(batch):
        raise StateMismatchError(f"batch {b}: rebuilt {len(report.applied)} of {len(batch)} edits")
    out: dict[str, Any] = {"batch": b, "seconds": time.perf_counter() - start}
    expected = record.get("edited_weights_sha256")
    if expected is not None:
        out["identical"] = expected == edited_weights_sha256(session.lm, session.editor.layers)
    now = diagnostics_summary(session.editor.diagnostics())
    old = record.get("diagnostics") or {}
    if now["drift_fro"] is not None and old.get("drift_fro"):
        out["drift_rel_diff"] = abs(now["drift_fro"] - old["drift_fro"]) / old["drift_fro"]
    layer_diffs = []
    for layer, was in (old.get("layers") or {}).items():
        new = now["layers"].get(layer, {})
        layer_diffs += [abs(new[key] - was[key]) / abs(was[key]) for key in ("drift_fro", "anchor_residual")
                        if was.get(key) and new.get(key) is not None]
    if layer_diffs:
        out["layer_rel_diff"] = max(layer_diffs)
    if out.get("identical") is False:
        how = "from its logged targets" if session.editor.logs_value_targets else "by computing it again"
        log.warning("batch %d rebuilt %s differs from the original run's weights "
                    "(largest relative difference of a layer's drift or anchor residual: %.2e)", b, how,
                    out.get("layer_rel_diff", float("nan")))
    return out


def rebuilt_summary(rebuilt: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How the batches rebuilt in this process (:func:`rebuild_batch`) matched their first run."""
    if not rebuilt:
        return None
    checked = [r for r in rebuilt if "identical" in r]
    diffs = [r["drift_rel_diff"] for r in rebuilt if "drift_rel_diff" in r]
    return {"count": len(rebuilt), "identical": sum(r["identical"] for r in checked), "checked": len(checked),
            "max_drift_rel_diff": max(diffs) if diffs else None,
            "max_layer_rel_diff": max((r["layer_rel_diff"] for r in rebuilt if "layer_rel_diff" in r), default=None),
            "seconds": sum(r["seconds"] for r in rebuilt)}
