"""What the method benchmark measures on a model: the checkpoint evaluation (CounterFact,
general suites, generation on a seeded sample of the edits applied, retention of the first edits), the
last batch's efficacy (the collapse stop), the end-of-stream extras (forgetting curve, fluency,
consistency) and the per-layer diagnostics totals."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError
from ..requests import EditRequest
from .counterfact_parts import counterfact_in_parts
from .methods_config import GEN_CHAT, MethodBenchConfig

log = logging.getLogger(__name__)


def evaluate_checkpoint(lm, requests: Sequence[EditRequest], config: MethodBenchConfig, general: Sequence[str],
                        plan: GenerationPlan | None = None,
                        locality_pre_edit: dict[str, list[list[int]]] | None = None,
                        records_out: list[dict[str, Any]] | None = None,
                        counterfact_records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The evaluation at a checkpoint: CounterFact on ``requests`` (the edits applied so far),
    the general suites, and the generation metrics of ``plan``'s sample among them. With
    ``locality_pre_edit`` (:func:`locality_reference` of the unedited model) CounterFact also
    reports EasyEdit's ``locality``. ``records_out``, when given, receives CounterFact's
    per-request records (the forgetting curve after the last batch reads them instead of
    scoring every edit prompt again: a quarter of an hour at 10,000 edits on a CPU).
    ``counterfact_records``: those records already scored on this model (in parts), used
    instead of scoring again. The first edits' efficacy (``retention_first``) is read from the
    same records: their rewrite prompts are among those CounterFact has just scored."""
    from ..eval.counterfact import summarize
    from ..eval.runner import DETAIL_KEYS, run_eval

    locality = None if locality_pre_edit is None else {"counterfact": locality_pre_edit}
    details = records_out is not None or bool(config.retention_first)
    out = run_eval(lm, counterfact=list(requests), general=tuple(general), data_dir=config.data_dir,
                   n=config.general_n, limit=config.gsm8k_limit, ppl_tokens=config.ppl_tokens,
                   batch_size=config.eval_batch_size, seed=config.seed, max_new_tokens=config.max_new_tokens,
                   pre_edit_locality=locality, details=details, counterfact_records=counterfact_records)
    records: list[dict[str, Any]] = []
    if details:  # keep only the records; the rest as without details
        records = out["counterfact"]["records"]
        if records_out is not None:
            records_out.extend(records)
        out["counterfact"] = {k: v for k, v in out["counterfact"].items() if k not in DETAIL_KEYS}
        out["general"] = {name: {k: v for k, v in res.items() if k not in DETAIL_KEYS}
                          for name, res in out.get("general", {}).items()}
        if not out["general"]:
            out.pop("general")
    if plan is not None:
        generation = evaluate_generation_sample(lm, requests, plan, config.retention_bins)
        if generation is not None:
            out["generation"] = generation
    if config.retention_first:
        first = records[:config.retention_first]
        if [r["id"] for r in first] != [q.id for q in requests[:config.retention_first]]:
            raise InvalidRequestError("CounterFact's records are not those of the applied edits, in order")
        out["retention_first"] = retention_of_first(lm, requests, config, plan,
                                                    efficacy=summarize(first).get("efficacy"))
    return out


def rewrite_efficacy(lm, requests: Sequence[EditRequest], config: MethodBenchConfig) -> float | None:
    """Teacher-forced efficacy of ``requests``: the share whose rewrite prompt gives the new object a
    lower mean NLL than the true one (ROME's p(new) > p(true); chance 0.5)."""
    from ..eval.counterfact import score_requests, summarize

    if not requests:
        return None
    records = score_requests(lm, requests, groups=("rewrite",), batch_size=config.eval_batch_size)
    return summarize(records).get("efficacy")


def last_batch_efficacy(lm, batch: Sequence[EditRequest], config: MethodBenchConfig) -> float | None:
    """Efficacy of the batch just applied: what the collapse stop watches (a method whose fresh
    edits no longer take has collapsed, whatever its older edits do)."""
    return rewrite_efficacy(lm, batch, config)


def retention_of_first(lm, applied: Sequence[EditRequest], config: MethodBenchConfig,
                       plan: GenerationPlan | None, *, efficacy: float | None = None) -> dict[str, Any]:
    """Efficacy of the first ``retention_first`` edits of the stream (those applied so far) and, with
    generation metrics on, *says it* on their edit prompts (:func:`first_edits_said`).

    ``efficacy``: theirs, already scored on these weights (read from the checkpoint's CounterFact
    records, or recorded by the checkpoint a re-score rebuilt bit for bit); without it their rewrite
    prompts are scored here."""
    first = list(applied[:config.retention_first])
    start = time.perf_counter()
    if efficacy is None:
        efficacy = rewrite_efficacy(lm, first, config)
    out: dict[str, Any] = {"edits": len(first), "efficacy": efficacy,
                           "generation": first_edits_said(lm, first, config, plan)}
    out["seconds"] = time.perf_counter() - start
    return out


def first_edits_said(lm, first: Sequence[EditRequest], config: MethodBenchConfig,
                     plan: GenerationPlan | None) -> dict[str, Any] | None:
    """*Says it* on the edit prompts of a seeded sample of ``gen_n`` of ``first`` (all of them while
    fewer have been applied; raw prompt, no chat, no other prompts); ``None`` with generation off."""
    from ..eval.generation import evaluate_generation, sample_positions

    if plan is None or not first:
        return None
    # min(gen_n, len(first)) of them: all of the first 500 at 500 edits, the same 500 of 1,000 from 1,000 on
    chosen = sample_positions(len(first), config.gen_n, config.seed)
    if not chosen:
        return None
    # only the edit prompt is generated: the other prompts are scored by the checkpoint's own sample
    bare = [dataclasses.replace(first[p], paraphrases=(), neighborhood=(), neighborhood_answers=(),
                                generation_prompts=()) for p in chosen]
    gen_config = dataclasses.replace(plan.config, n=None, chat=False, portability=False, samples=0)
    result = evaluate_generation(lm, bare, gen_config)
    return {"edits": len(chosen), "edit_begins": result["summary"]["edit_begins"]}


def locality_reference(lm, requests: Sequence[EditRequest], config: MethodBenchConfig) -> dict[str, list[list[int]]]:
    """The unedited model's teacher-forced argmaxes on every edit's neighbourhood prompts + answers,
    by edit id: what EasyEdit's locality compares every method's against."""
    from ..eval.counterfact import neighborhood_predictions

    return neighborhood_predictions(lm, requests, batch_size=config.eval_batch_size)


@dataclass(frozen=True)
class GenerationPlan:
    """Which edits the generation metrics score and how, and the unedited model's neighbourhood
    continuations (``pre_edit``).

    A checkpoint after ``applied`` edits scores ``min(gen_n, applied)`` of them (:meth:`at`): first the
    stream's own seeded sample (``positions``: ``gen_n`` of all positions, what the last checkpoint and
    the unedited row score) among the applied ones, then, where fewer than ``gen_n`` of those have been
    applied, the next applied positions of a seeded order of the others (``fill``). Every method
    scores the same edits at the same checkpoint.
    """

    positions: tuple[int, ...]
    config: Any  # rlsedit.eval.generation.GenerationConfig
    pre_edit: dict[str, str] | None = None
    fill: tuple[int, ...] = ()

    def at(self, applied: int) -> list[int]:
        """The stream positions scored after ``applied`` edits, in ascending order."""
        chosen = [p for p in self.positions if p < applied]
        want = min(len(self.positions), applied)  # gen_n, or the whole stream when it is shorter
        if len(chosen) < want:
            chosen += [p for p in self.fill if p < applied][:want - len(chosen)]
        return sorted(chosen)

    def union(self, counts: Sequence[int]) -> list[int]:
        """Every position some checkpoint after ``counts`` edits scores (their unedited
        continuations must be in ``pre_edit``)."""
        return sorted(set(self.positions).union(*(self.at(c) for c in counts)))


def generation_plan(config: MethodBenchConfig, requests: Sequence[EditRequest]) -> GenerationPlan | None:
    """The run's generation sample and settings (``None`` when ``gen_n`` is 0); ``pre_edit`` is
    filled in once the unedited model has been scored."""
    if not config.gen_n:
        return None
    from ..eval.generation import GenerationConfig, paraphrase_kind_of_file, sample_positions

    gen = GenerationConfig(max_new_tokens=config.gen_max_new_tokens, seed=config.seed,
                           paraphrase_kind=paraphrase_kind_of_file(config.data), chat=GEN_CHAT[config.gen_chat],
                           batch_size=config.eval_batch_size)
    positions = sample_positions(len(requests), config.gen_n, config.seed)
    taken = set(positions)
    fill = [p for p in range(len(requests)) if p not in taken]
    random.Random(config.seed + 1).shuffle(fill)  # its own stream, so the stream's sample stays as it was
    return GenerationPlan(tuple(positions), gen, fill=tuple(fill))


def evaluate_generation_sample(lm, applied: Sequence[EditRequest], plan: GenerationPlan,
                               n_bins: int) -> dict[str, Any] | None:
    """Generation metrics of the sampled edits among ``applied`` (``None`` when none is), with
    the edit prompt's *begins with* binned by stream position (the generation forgetting curve)."""
    from ..eval.generation import evaluate_generation
    from ..eval.retention import bin_by_position

    chosen = plan.at(len(applied))
    if not chosen:
        return None
    start = time.perf_counter()
    result = evaluate_generation(lm, [applied[p] for p in chosen], plan.config, pre_edit=plan.pre_edit)
    said: list[bool | None] = [None] * len(applied)
    for rec in result["records"]:
        said[chosen[rec["position"]]] = rec["edit"]["new_begins"]
    out = {k: v for k, v in result.items() if k != "records"}
    out["bins"] = {"edit_begins": bin_by_position(said, n_bins)}
    out["seconds"] = time.perf_counter() - start
    return out


def final_extras(lm, requests: Sequence[EditRequest], config: MethodBenchConfig, consistency_ref,
                 records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Forgetting curve over the whole stream (from ``records``, CounterFact's per-request records
    of ``requests`` on the model as it is now, when given), and fluency/consistency on the first
    ``fluency_n`` edits."""
    from ..eval.counterfact import evaluate_counterfact
    from ..eval.retention import forgetting_curve

    start = time.perf_counter()
    curve = forgetting_curve(lm, requests, n_bins=config.retention_bins, batch_size=config.eval_batch_size,
                             records=records)
    out: dict[str, Any] = {"retention": {"bins": curve["bins"], "chance": curve["chance"]}}
    out["retention_seconds"] = time.perf_counter() - start
    if config.fluency_n:
        start = time.perf_counter()
        subset = list(requests[:config.fluency_n])
        gen = evaluate_counterfact(lm, subset, batch_size=config.eval_batch_size, fluency=True,
                                   consistency=consistency_ref, seed=config.seed)
        summary = gen["summary"]
        out["generation"] = {
            "edits": len(subset),
            "fluency": summary.get("fluency"),
            "consistency": summary.get("consistency"),
            "notes": gen["notes"],
        }
        out["generation_seconds"] = time.perf_counter() - start
    return out


@dataclass(frozen=True)
class RunScoring:
    """What every row of one benchmark run is scored with, fixed before its first edit: the
    settings, the general suites, the generation plan (with the unedited continuations), EasyEdit
    locality's unedited reference and consistency's reference texts. The unedited row and every
    method's checkpoints score with the same one, so their figures compare."""

    config: MethodBenchConfig
    general: tuple[str, ...]
    plan: GenerationPlan | None = None
    locality_pre_edit: dict[str, list[list[int]]] | None = None
    consistency_ref: Any = None

    def checkpoint(self, lm, requests: Sequence[EditRequest], parts: Path, weights: dict[str, Any], *,
                   records_out: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """:func:`evaluate_checkpoint` of ``lm`` after ``requests``, its CounterFact records scored
        a part at a time into ``parts`` (:func:`~rlsedit.bench.counterfact_parts.counterfact_in_parts`,
        ``weights`` naming the weights scored): a stop keeps the parts done."""
        scored = counterfact_in_parts(lm, requests, parts, weights, batch_size=self.config.eval_batch_size,
                                      pre_edit_locality=self.locality_pre_edit)
        return evaluate_checkpoint(lm, requests, self.config, self.general, self.plan, self.locality_pre_edit,
                                   records_out=records_out, counterfact_records=scored)

    def final(self, lm, requests: Sequence[EditRequest],
              records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        """:func:`final_extras` of ``lm`` after ``requests``."""
        return final_extras(lm, requests, self.config, self.consistency_ref, records=records)


def consistency_reference(config: MethodBenchConfig, requests: Sequence[EditRequest]):
    """The reference texts consistency is scored against (``None`` when there is no corpus file)."""
    if not config.fluency_n or config.data_dir is None:
        return None
    from ..eval.consistency import ConsistencyReference
    from ..eval.runner import DATA_FILES

    path = Path(config.data_dir) / DATA_FILES["corpus"]
    if not path.is_file():
        log.warning("no consistency reference corpus at %s; consistency is skipped", path)
        return None
    return ConsistencyReference.from_corpus(path, [r.target_new for r in requests[:config.fluency_n]])


def diagnostics_summary(per_layer: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-layer diagnostics plus totals over layers (root of the sum of squares)."""
    drift = [d["drift_fro"] for d in per_layer.values() if d.get("drift_fro") is not None]
    anchor = [d["anchor_residual"] for d in per_layer.values() if d.get("anchor_residual") is not None]
    return {
        "layers": per_layer,
        "drift_fro": math.sqrt(sum(x * x for x in drift)) if drift else None,
        "anchor_residual": math.sqrt(sum(x * x for x in anchor)) if anchor else None,
    }
