"""zsRE editing metrics (MEND / EasyEdit definitions): teacher-forced token accuracy.

For a prompt ``p`` and target tokens ``t_1..t_n`` (one leading space, see
:func:`rlsedit.requests.target_text`), the token accuracy is

    acc(p, t) = (1/n) Σ_j [ argmax_v p(v | p, t_<j) = t_j ].

* **edit** (reliability): ``acc(src, alt)``;
* **rephrase** (generality): ``acc(rephrase, alt)``, averaged over the request's rephrasings;
* **locality**: MEND/EasyEdit compare the edited model's teacher-forced argmaxes on
  ``loc + loc_ans`` with the *unedited* model's: ``(1/n) Σ_j [argmax_post_j = argmax_pre_j]``.
  That needs the pre-edit predictions, which :func:`locality_predictions` records (call it
  before editing and pass the result as ``pre_edit_locality``). Without them only
  ``locality_answer_acc = acc(loc, loc_ans)`` is reported — accuracy against the NQ answer,
  which an unedited small model mostly gets wrong, so it is *not* the same number.

Per request a metric is the mean over its prompts; the summary is the mean over requests.
Guessing scores ``1/V`` per token (``V`` the vocabulary size).
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence

from ..requests import EditRequest, target_text
from .datafiles import EvalDataError
from .scoring import score_continuations


def _locality_pairs(req: EditRequest) -> list[tuple[str, str]]:
    if req.neighborhood and len(req.neighborhood_answers) != len(req.neighborhood):
        raise EvalDataError(
            f"edit {req.id!r}: {len(req.neighborhood)} locality prompts but "
            f"{len(req.neighborhood_answers)} answers; zsRE locality needs one answer per prompt"
        )
    return list(zip(req.neighborhood, req.neighborhood_answers))


def locality_predictions(lm, requests: Sequence[EditRequest], *, batch_size: int = 16) -> dict[str, list[list[int]]]:
    """Teacher-forced argmax token ids on every ``loc + loc_ans``, keyed by request id.

    Record this on the unedited model; it is plain JSON (ids are ints) and can be stored.
    """
    flat = [(req.id, p, a) for req in requests for p, a in _locality_pairs(req)]
    scores = score_continuations(lm, [p for _, p, _ in flat], [target_text(a) for _, _, a in flat],
                                 batch_size=batch_size)
    out: dict[str, list[list[int]]] = {req.id: [] for req in requests}
    for (rid, _, _), score in zip(flat, scores):
        out[rid].append(list(score.argmax_ids))
    return out


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def evaluate_zsre(
    lm,
    requests: Sequence[EditRequest],
    *,
    pre_edit_locality: Mapping[str, Sequence[Sequence[int]]] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """zsRE metrics of ``requests`` on the model as it is now.

    Returns ``{"summary", "chance", "records", "notes"}``; each record has ``id``,
    ``edit_acc``, ``rephrase_acc``, ``locality_answer_acc`` and, when
    ``pre_edit_locality`` (from :func:`locality_predictions`) is given, ``locality``.
    """
    if not requests:
        raise EvalDataError("evaluate_zsre needs at least one request")
    rows: list[tuple[int, str, str, str]] = []  # (request index, kind, prompt, target)
    for i, req in enumerate(requests):
        rows.append((i, "edit", req.text, req.target_new))
        rows.extend((i, "rephrase", p, req.target_new) for p in req.paraphrases)
        rows.extend((i, "locality", p, a) for p, a in _locality_pairs(req))
    scores = score_continuations(lm, [r[2] for r in rows], [target_text(r[3]) for r in rows],
                                 batch_size=batch_size)
    per: list[dict[str, list]] = [{"edit": [], "rephrase": [], "locality": []} for _ in requests]
    for (i, kind, _, _), score in zip(rows, scores):
        per[i][kind].append(score)

    records = []
    for req, got in zip(requests, per):
        record: dict[str, Any] = {
            "id": req.id,
            "edit_acc": _mean([s.token_accuracy for s in got["edit"]]),
            "rephrase_acc": _mean([s.token_accuracy for s in got["rephrase"]]),
            "locality_answer_acc": _mean([s.token_accuracy for s in got["locality"]]),
        }
        if pre_edit_locality is not None:
            if req.id not in pre_edit_locality:
                raise EvalDataError(f"pre_edit_locality has no entry for edit {req.id!r}; record it for every request")
            before = pre_edit_locality[req.id]
            if len(before) != len(got["locality"]):
                raise EvalDataError(
                    f"edit {req.id!r}: pre_edit_locality has {len(before)} prompts, the request has {len(got['locality'])}"
                )
            agree = []
            for pre_ids, score in zip(before, got["locality"]):
                if len(pre_ids) != len(score.argmax_ids):
                    raise EvalDataError(
                        f"edit {req.id!r}: pre-edit locality predictions have {len(pre_ids)} tokens, "
                        f"now {len(score.argmax_ids)}; were they recorded with another tokenizer?"
                    )
                # locality = (1/n) Σ_j [argmax_post_j = argmax_pre_j]
                agree.append(sum(int(a) == b for a, b in zip(pre_ids, score.argmax_ids)) / len(pre_ids))
            record["locality"] = _mean(agree)
        records.append(record)

    keys = ["edit_acc", "rephrase_acc", "locality_answer_acc"] + (["locality"] if pre_edit_locality is not None else [])
    summary: dict[str, Any] = {"requests": len(records)}
    for key in keys:
        values = [r[key] for r in records if r[key] is not None]
        summary[key] = _mean(values)
        summary[f"{key}_n"] = len(values)
    chance = {key: 1.0 / len(lm.tokenizer) for key in ("edit_acc", "rephrase_acc", "locality_answer_acc")}
    notes = ["token accuracy, teacher forced (MEND/EasyEdit)"]
    if pre_edit_locality is None:
        notes.append("locality needs pre-edit predictions (locality_predictions); only locality_answer_acc "
                     "(accuracy against loc_ans) is reported")
    return {"summary": summary, "chance": chance, "records": records, "notes": notes}
