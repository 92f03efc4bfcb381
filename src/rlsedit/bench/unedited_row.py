"""The benchmark's unedited row (``unedited.json``): what every method starts from and is compared
against, scored once for all the processes that share ``out``.

It is written in stages, each kept on disk when done, because at 10,000 edits on a CPU the whole
row takes hours and a working session may end in the middle of it:

1. the base weights' sha256 and fingerprint (every method's weights are checked against them);
2. EasyEdit locality's reference: the unedited argmaxes on every neighbourhood prompt;
3. the unedited continuations of every checkpoint's generation sample;
4. the row's own scores (CounterFact, generation, general suites, forgetting curve, fluency),
   whose CounterFact records are appended to ``unedited-counterfact.jsonl`` a part at a time
   while they run (:mod:`rlsedit.bench.counterfact_parts`), and which are written to
   ``unedited.json`` as a whole.

A stage is computed by the first process to arrive without it, under the lock on ``out``
(:mod:`rlsedit.bench.resume`); a row written by an older version gets its missing stages the
same way.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import StateMismatchError
from ..requests import EditRequest
from .edit_stream import checkpoint_plan
from .methods_config import MethodBenchConfig
from .methods_eval import GenerationPlan, RunScoring, generation_plan, locality_reference
from .resume import UNEDITED_SCORES, add_to_unedited, merge_into_unedited, unedited_once

log = logging.getLogger(__name__)

LOCALITY_PRE_EDIT = "locality_pre_edit"  # the unedited row's key of EasyEdit locality's reference
GENERATION_PRE_EDIT = "generation_pre_edit"  # the unedited row's continuations of the sampled prompts
UNEDITED_PARTS_FILE = "unedited-counterfact.jsonl"  # the unedited row's CounterFact records while it scores them


def unedited_row(out: Path, config: MethodBenchConfig, requests: list[EditRequest], general: Sequence[str],
                 consistency_ref) -> tuple[dict[str, Any], RunScoring]:
    """The finished unedited row of ``out`` (its missing stages computed first, module doc) and
    what the run's rows are scored with: the unedited references its stages recorded."""
    unedited = unedited_once(out, lambda: _unedited_identity(config))
    if LOCALITY_PRE_EDIT not in unedited:
        unedited = add_to_unedited(out, (LOCALITY_PRE_EDIT,),
                                   lambda: {LOCALITY_PRE_EDIT: _locality_pre_edit(config, requests)})
    scoring = RunScoring(config, tuple(general), generation_plan_with_pre_edit(out, config, requests),
                         unedited[LOCALITY_PRE_EDIT], consistency_ref)
    parts = out / UNEDITED_PARTS_FILE
    unedited = add_to_unedited(out, UNEDITED_SCORES, lambda: _score_unedited(
        scoring, requests, unedited["weights_sha256"], parts))
    parts.unlink(missing_ok=True)  # in unedited.json now
    return unedited, scoring


def _base_model(config: MethodBenchConfig, base_sha: str | None = None):
    """The base model, freshly loaded for one stage of the unedited row; with ``base_sha``, refused
    unless its weights are those the row began with."""
    from ..model.load import load_model
    from ..model.weights import weights_sha256

    lm = load_model(config.model, device=config.device, cache_dir=config.cache_dir)
    if base_sha is not None and weights_sha256(lm) != base_sha:
        raise StateMismatchError(f"{config.model}: the weights differ from those the unedited row of this "
                                 "benchmark began with; use another --out")
    return lm


def _unedited_identity(config) -> dict[str, Any]:
    """The unedited row's first stage: which weights every method must start from."""
    from ..model.weights import weights_sha256

    lm = _base_model(config)
    return {"weights_sha256": weights_sha256(lm), "model_fingerprint": lm.fingerprint}


def _score_unedited(scoring: RunScoring, requests, base_sha: str, parts: Path) -> dict[str, Any]:
    """The unedited row's own scores (its last stage), on the weights its first stage recorded;
    its CounterFact records are kept in ``parts`` as they are scored (hours at 10,000 edits on a
    CPU), so a restart continues them.

    Its locality and "neighbour gen unchanged" compare the base model with itself in other
    batches (a determinism check): the methods' figures compare against the same references.
    """
    start = time.perf_counter()
    lm = _base_model(scoring.config, base_sha)
    records: list[dict[str, Any]] = []
    evaluation = scoring.checkpoint(lm, requests, parts, {"weights_sha256": base_sha}, records_out=records)
    extras = scoring.final(lm, requests, records=records)
    return {"evaluation": evaluation, "final": extras, "seconds": time.perf_counter() - start}


def checkpoint_edit_counts(config: MethodBenchConfig, n_requests: int) -> list[int]:
    """The edit count of every checkpoint of the run (the batch that reaches each)."""
    plan = checkpoint_plan(n_requests, config.batch_size, config.checkpoints, config.checkpoint_edits)
    return [min(b * config.batch_size, n_requests) for b in sorted(plan)]


def generation_plan_with_pre_edit(out: Path, config: MethodBenchConfig,
                                  requests: list[EditRequest]) -> GenerationPlan | None:
    """The run's generation plan (``None`` without generation metrics) with the unedited
    continuations of every checkpoint's sample, from ``unedited.json``: the row's third stage
    computes them (and a row scored when checkpoints sampled fewer edits gets the missing ones)."""
    plan = generation_plan(config, requests)
    if plan is None:
        return None
    unedited = merge_into_unedited(out, GENERATION_PRE_EDIT, lambda have: _missing_pre_edit(config, requests, plan, have))
    return dataclasses.replace(plan, pre_edit=unedited.get(GENERATION_PRE_EDIT))


def _missing_pre_edit(config, requests, plan: GenerationPlan, have: dict[str, str] | None) -> dict[str, str]:
    """The unedited continuations of the checkpoint samples' prompts not in ``have`` (the base
    model is loaded only when some are missing)."""
    from ..eval.generation import pre_edit_generations, pre_edit_prompts

    have = have or {}
    sampled = [requests[p] for p in plan.union(checkpoint_edit_counts(config, len(requests)))]
    missing = [r for r in sampled if any(p not in have for p in pre_edit_prompts(r, plan.config))]
    if not missing:
        return {}
    log.info("unedited continuations for %d more sampled edits", len(missing))
    return pre_edit_generations(_base_model(config), missing, plan.config)


def _locality_pre_edit(config, requests) -> dict[str, list[list[int]]]:
    """The unedited row's second stage: EasyEdit locality's reference (a row written before it was
    recorded also gets it here)."""
    return locality_reference(_base_model(config), requests, config)
