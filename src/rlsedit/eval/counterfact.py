"""CounterFact editing metrics: ROME's probability comparisons, EasyEdit's top-1 accuracy,
fluency and consistency of generations.

For a request with subject prompt ``x``, new object ``o*`` and old object ``o``, and a
per-token negative log-likelihood ``NLL(t | p) = −(1/|t|) Σ_j log p(t_j | p, t_<j)``
(targets tokenized with one leading space, :func:`rlsedit.requests.target_text`):

* **Efficacy** (rewrite prompt ``x``): success ``[NLL(o* | x) < NLL(o | x)]``, i.e. the new
  object is more likely than the old one (ROME's ``rewrite_prompts`` success).
* **Generalization** (each paraphrase ``x'``): ``[NLL(o* | x') < NLL(o | x')]``.
* **Specificity** (each neighborhood prompt ``n`` with its answer ``a``): success
  ``[NLL(a | n) < NLL(o* | n)]``, the answer stays more likely than the new object (ROME's
  neighborhood success). In ROME's full layout ``a = o`` for every neighborhood prompt; in
  the MEND/EasyEdit layout ``a`` is the record's ``locality_ground_truth``.

Per request, a group's score is the mean over its prompts; the summary is the mean over
requests (ROME's aggregation). Alongside each success rate:

* ``*_acc``: EasyEdit-style teacher-forced top-1 token accuracy of the good target
  (``o*`` for rewrite/paraphrase, ``a`` for neighborhood):
  ``(1/|t|) Σ_j [argmax p(· | p, t_<j) = t_j]``;
* ``*_exact``: every target token is the argmax (greedy decoding would produce the target).

``neighborhood_acc`` is accuracy against the answer ``a``, *not* EasyEdit's locality, which
compares the edited model's teacher-forced argmaxes on ``n + a`` with the unedited model's:
``locality = (1/|a|) Σ_j [argmax_post_j = argmax_pre_j]`` per prompt. It is reported as
``locality`` when the unedited model's argmaxes (:func:`neighborhood_predictions`) are passed
to :func:`evaluate_counterfact` as ``pre_edit_locality``.

Fluency (optional, it generates text): ROME's weighted bi-/tri-gram entropy
(:mod:`rlsedit.eval.fluency`) of ``prompt + generation`` for each of the request's
``generation_prompts``; a layout without generation prompts (MEND/EasyEdit, ours) uses the
edit prompt ``x`` itself. ROME samples with top-k = 5 (``decoding="sample"``, seeded) up to
100 tokens *including* the prompt; we generate ``max_new_tokens`` (default 90) after it.
``decoding="greedy"`` is deterministic but gives lower entropies on small models.
Consistency (optional): TF-IDF cosine between the joined generations and reference text
about ``o*`` (:class:`rlsedit.eval.consistency.ConsistencyReference`).

Chance levels: a success rate compares two candidates, so a guess scores 0.5; top-1 token
accuracy by guessing is ``1/V`` (``V`` the vocabulary size).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import InvalidRequestError
from ..requests import EditRequest, target_text
from .consistency import ConsistencyReference
from .datafiles import EvalDataError
from .fluency import ngram_entropy
from .decoding import greedy_generate, sample_generate
from .scoring import ContinuationScore, score_continuations

logger = logging.getLogger(__name__)

GROUPS = ("rewrite", "paraphrase", "neighborhood")
SUMMARY_NAMES = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "specificity"}
DECODINGS = ("sample", "greedy")


@dataclass(frozen=True)
class Probe:
    """One prompt of one request: the target that should win (``good``) and its rival (``bad``)."""

    request: int
    group: str
    prompt: str
    good: str
    bad: str | None


def neighborhood_answers(req: EditRequest) -> tuple[str, ...]:
    """The answer each neighborhood prompt should keep (the record's own, else ``target_true``)."""
    if not req.neighborhood:
        return ()
    if req.neighborhood_answers:
        if len(req.neighborhood_answers) != len(req.neighborhood):
            raise InvalidRequestError(
                f"edit {req.id!r}: {len(req.neighborhood)} neighborhood prompts but "
                f"{len(req.neighborhood_answers)} answers; give one answer per prompt"
            )
        return req.neighborhood_answers
    if req.target_true is not None:
        return (req.target_true,) * len(req.neighborhood)
    return ()


def probes(req: EditRequest, index: int, groups: Sequence[str] = GROUPS) -> list[Probe]:
    """The prompts of one request in the asked groups (see the module docstring)."""
    out: list[Probe] = []
    if "rewrite" in groups:
        out.append(Probe(index, "rewrite", req.text, req.target_new, req.target_true))
    if "paraphrase" in groups:
        out.extend(Probe(index, "paraphrase", p, req.target_new, req.target_true) for p in req.paraphrases)
    if "neighborhood" in groups:
        answers = neighborhood_answers(req)
        out.extend(Probe(index, "neighborhood", p, a, req.target_new) for p, a in zip(req.neighborhood, answers))
    return out


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _group_record(group: str, scored: list[tuple[Probe, ContinuationScore, ContinuationScore | None]]) -> dict:
    """Per-request means of one group: success, margin, token accuracy, exact match."""
    with_rival = [(g, b) for _, g, b in scored if b is not None]
    return {
        f"{group}_count": len(scored),
        # success = [NLL(good) < NLL(bad)]; margin = NLL(bad) − NLL(good) (> 0 is success)
        f"{group}_success": _mean([float(g.mean_nll < b.mean_nll) for g, b in with_rival]),
        f"{group}_margin": _mean([b.mean_nll - g.mean_nll for g, b in with_rival]),
        f"{group}_acc": _mean([g.token_accuracy for _, g, _ in scored]),
        f"{group}_exact": _mean([float(g.all_correct) for _, g, _ in scored]),
    }


def score_requests(
    lm, requests: Sequence[EditRequest], *, groups: Sequence[str] = GROUPS, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Probability and top-1 metrics of every request, one record per request.

    All prompts of all requests are scored in one batched pass (each distinct
    ``(prompt, target)`` pair once). A record holds ``id`` and, per group, ``{group}_count``,
    ``{group}_success``, ``{group}_margin``, ``{group}_acc``, ``{group}_exact``; a value is
    ``None`` when the request has no prompt of that group (or no rival target).
    """
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise EvalDataError(f"unknown CounterFact group(s) {unknown}; choose from {list(GROUPS)}")
    all_probes = [p for i, req in enumerate(requests) for p in probes(req, i, groups)]
    pairs: dict[tuple[str, str], int] = {}
    for probe in all_probes:
        for target in (probe.good, probe.bad):
            if target is not None:
                pairs.setdefault((probe.prompt, target_text(target)), len(pairs))
    keys = list(pairs)
    scores = score_continuations(lm, [k[0] for k in keys], [k[1] for k in keys], batch_size=batch_size)

    def lookup(prompt: str, target: str | None) -> ContinuationScore | None:
        return None if target is None else scores[pairs[(prompt, target_text(target))]]

    by_request: list[dict[str, list]] = [{g: [] for g in groups} for _ in requests]
    for probe in all_probes:
        by_request[probe.request][probe.group].append(
            (probe, lookup(probe.prompt, probe.good), lookup(probe.prompt, probe.bad))
        )
    records = []
    for req, grouped in zip(requests, by_request):
        record: dict[str, Any] = {"id": req.id}
        for group in groups:
            record.update(_group_record(group, grouped[group]))
        records.append(record)
    return records


def neighborhood_predictions(lm, requests: Sequence[EditRequest], *, batch_size: int = 16) -> dict[str, list[list[int]]]:
    """Teacher-forced argmax token ids on every neighborhood prompt + its answer, keyed by request
    id: EasyEdit locality's reference. Record it on the unedited model (plain JSON)."""
    flat = [(req.id, p, a) for req in requests for p, a in zip(req.neighborhood, neighborhood_answers(req))]
    scores = score_continuations(lm, [p for _, p, _ in flat], [target_text(a) for _, _, a in flat],
                                 batch_size=batch_size)
    out: dict[str, list[list[int]]] = {req.id: [] for req in requests}
    for (rid, _, _), score in zip(flat, scores):
        out[rid].append([int(t) for t in score.argmax_ids])
    return out


def _add_locality(lm, requests, records, pre_edit_locality, batch_size: int) -> None:
    """``record["locality"]``: mean over neighborhood prompts of the share of answer tokens whose
    argmax is the unedited model's (EasyEdit locality)."""
    post = neighborhood_predictions(lm, requests, batch_size=batch_size)
    for req, record in zip(requests, records):
        before = pre_edit_locality.get(req.id)
        if before is None or len(before) != len(post[req.id]) \
                or any(len(b) != len(a) for b, a in zip(before, post[req.id])):
            raise EvalDataError(f"edit {req.id!r}: pre_edit_locality does not match its neighborhood prompts "
                                "(record it with neighborhood_predictions on the unedited model)")
        record["locality"] = _mean([sum(int(x) == y for x, y in zip(b, a)) / len(a)
                                    for b, a in zip(before, post[req.id]) if a])


def generation_prompts(req: EditRequest) -> tuple[str, ...]:
    """ROME's ``generation_prompts`` when the record has them, else the edit prompt."""
    return req.generation_prompts or (req.text,)


def generate_for_requests(
    lm,
    requests: Sequence[EditRequest],
    *,
    decoding: str = "sample",
    max_new_tokens: int = 90,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 8,
) -> list[list[str]]:
    """``prompt + generation`` for each generation prompt of each request (ROME scores the
    full text, prompt included)."""
    if decoding not in DECODINGS:
        raise EvalDataError(f"decoding must be one of {list(DECODINGS)}, got {decoding!r}")
    flat = [(i, p) for i, req in enumerate(requests) for p in generation_prompts(req)]
    prompts = [p for _, p in flat]
    if decoding == "greedy":
        outs = greedy_generate(lm, prompts, max_new_tokens, batch_size=batch_size)
    else:
        outs = sample_generate(lm, prompts, max_new_tokens, top_k=top_k, seed=seed, batch_size=batch_size)
    texts: list[list[str]] = [[] for _ in requests]
    for (i, prompt), out in zip(flat, outs):
        texts[i].append(prompt + out)
    return texts


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over requests (``None`` entries skipped) under ROME's names; ``score`` is the
    harmonic mean of efficacy, generalization and specificity when all three exist."""
    summary: dict[str, Any] = {"requests": len(records)}
    for group, name in SUMMARY_NAMES.items():
        for suffix, key in (("success", name), ("acc", f"{name}_acc"), ("exact", f"{name}_exact"),
                            ("margin", f"{name}_margin")):
            field_name = f"{group}_{suffix}"
            if any(field_name in r for r in records):
                values = [r[field_name] for r in records if r.get(field_name) is not None]
                summary[key] = _mean(values)
                summary[f"{key}_n"] = len(values)
    parts = [summary.get(SUMMARY_NAMES[g]) for g in GROUPS]
    if all(p is not None for p in parts):
        summary["score"] = 0.0 if min(parts) == 0 else statistics.harmonic_mean(parts)
    for key in ("locality", "fluency", "consistency"):
        values = [r[key] for r in records if r.get(key) is not None]
        if any(key in r for r in records):
            summary[key] = _mean(values)
            summary[f"{key}_n"] = len(values)
    return summary


def counterfact_records(lm, requests: Sequence[EditRequest], *, batch_size: int = 16,
                        pre_edit_locality: dict[str, Sequence[Sequence[int]]] | None = None) -> list[dict[str, Any]]:
    """The teacher-forced part of :func:`evaluate_counterfact`: one record per request
    (:func:`score_requests`), with EasyEdit's ``locality`` when ``pre_edit_locality`` is given."""
    records = score_requests(lm, requests, batch_size=batch_size)
    if pre_edit_locality is not None:
        _add_locality(lm, requests, records, pre_edit_locality, batch_size)
    return records


def evaluate_counterfact(
    lm,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 16,
    fluency: bool = False,
    consistency: ConsistencyReference | None = None,
    decoding: str = "sample",
    max_new_tokens: int = 90,
    seed: int = 0,
    keep_generations: bool = False,
    pre_edit_locality: dict[str, Sequence[Sequence[int]]] | None = None,
    records: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """All CounterFact metrics of ``requests`` on the model as it is now.

    With ``pre_edit_locality`` (:func:`neighborhood_predictions` on the unedited model) each
    record and the summary also get EasyEdit's ``locality``. ``records``, when given, are the
    teacher-forced records of ``requests`` already scored on this model
    (:func:`counterfact_records`, e.g. in parts across a restart); they are used instead of
    scoring again.

    Returns ``{"summary": {...}, "chance": {...}, "records": [...], "notes": [...]}``;
    records are per request (see :func:`score_requests`), plus ``fluency`` /
    ``consistency`` (and ``generations`` if ``keep_generations``) when generation is on.
    Generation runs when ``fluency`` is true or a ``consistency`` reference is given.
    """
    if not requests:
        raise EvalDataError("evaluate_counterfact needs at least one request")
    if records is None:
        records = counterfact_records(lm, requests, batch_size=batch_size, pre_edit_locality=pre_edit_locality)
    else:
        records = [dict(r) for r in records]
        if [r.get("id") for r in records] != [req.id for req in requests]:
            raise EvalDataError("records do not belong to these requests (one per request, in their order)")
        if pre_edit_locality is not None and any("locality" not in r for r in records):
            raise EvalDataError("records were scored without pre_edit_locality; score them with it")
    notes = [
        "success = per-token NLL comparison (ROME); *_acc = teacher-forced top-1 token accuracy "
        "(EasyEdit); *_exact = all target tokens top-1; neighborhood_acc is accuracy against the "
        "answer, EasyEdit's locality (pre/post argmax agreement) is 'locality'",
    ]
    if fluency or consistency is not None:
        texts = generate_for_requests(lm, requests, decoding=decoding, max_new_tokens=max_new_tokens,
                                      seed=seed, batch_size=max(1, batch_size // 2))
        for req, record, gens in zip(requests, records, texts):
            if fluency:
                record["fluency"] = ngram_entropy(gens)
            if consistency is not None:
                record["consistency"] = consistency.similarity(gens, req.target_new)
            if keep_generations:
                record["generations"] = gens
        notes.append(
            f"generations: {decoding} decoding, {max_new_tokens} new tokens, seed {seed}; "
            "prompts = generation_prompts, or the edit prompt when the record has none"
        )
        if consistency is not None:
            notes.append(f"consistency {consistency.label} ({consistency.source})")
    vocab = len(lm.tokenizer)
    chance = {name: 0.5 for name in SUMMARY_NAMES.values()}
    chance.update({f"{name}_acc": 1.0 / vocab for name in SUMMARY_NAMES.values()})
    return {"summary": summarize(records), "chance": chance, "records": records, "notes": notes}
