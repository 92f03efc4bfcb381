"""zsRE editing metrics (MEND / EasyEdit definitions): teacher-forced token accuracy.

For a prompt ``p`` and target tokens ``t_1..t_n`` (one leading space, see
:func:`rlsedit.requests.target_text`), the token accuracy is

    acc(p, t) = (1/n) Σ_j [ argmax_v p(v | p, t_<j) = t_j ].

Two conventions decide what is edited and asked (:data:`CONVENTIONS`; every result names its
own under ``"convention"``):

* ``"memit"`` (the default; MEMIT, AlphaEdit and RLSEdit tables, ``memit/dsets/zsre.py``):
  edit toward ``answers[0]``, locality prompts ``loc + "?"``; there is no old object (MEMIT's
  ``target_true`` is ``"<|endoftext|>"``), so the requests carry none;
* ``"easyedit"`` (EasyEdit / MEND): edit toward ``alt``, locality prompts ``loc`` as they are.

The edits and the scores must follow the same convention. ``rlsedit edit`` writes a MEND
record as :func:`rlsedit.requests.parse_request` reads it, toward ``alt`` (EasyEdit's), or with
``--zsre-convention memit`` the :func:`zsre_requests` of MEMIT's; :func:`resolve_convention`
reads the convention an edited state followed from the targets its journal holds, so
``rlsedit eval --state`` scores it under that one and refuses another.

Requests come in as :func:`rlsedit.requests.parse_request` reads a MEND record
(``target_new = alt``, ``target_true = answers[0]``); :func:`zsre_requests` turns them into the
convention's requests — the ones to edit with — and the functions here apply it themselves.
With ``target`` the convention's edit target:

* **edit** (reliability): ``acc(src, target)``;
* **rephrase** (generality): ``acc(rephrase, target)``, averaged over the request's rephrasings;
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

import dataclasses
import statistics
from typing import Any, Mapping, Sequence

from ..requests import EditRequest, iter_records, target_text
from .datafiles import EvalDataError
from .scoring import score_continuations


CONVENTIONS = ("memit", "easyedit")
"""zsRE conventions: ``"memit"`` (toward ``answers[0]``, ``"?"`` after locality prompts) or
``"easyedit"`` (toward ``alt``, locality prompts unchanged)."""

DEFAULT_CONVENTION = "memit"
"""The convention of the papers we compare against (MEMIT, AlphaEdit, RLSEdit)."""


def zsre_requests(requests: Sequence[EditRequest], convention: str = DEFAULT_CONVENTION) -> list[EditRequest]:
    """The requests to edit and score under ``convention``, from requests as read from MEND records.

    ``"memit"``: ``target_new`` becomes ``target_true`` (``answers[0]``) and ``"?"`` is appended to
    every locality prompt (``memit/dsets/zsre.py``: ``record["loc"] + "?"``). ``"easyedit"``: unchanged.
    Raises :class:`EvalDataError` for an unknown convention or, under ``"memit"``, a request
    without ``answers``.
    """
    if convention not in CONVENTIONS:
        raise EvalDataError(f"unknown zsRE convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if convention == "easyedit":
        return list(requests)
    out = []
    for req in requests:
        if not req.target_true:
            raise EvalDataError(f"edit {req.id!r}: the 'memit' zsRE convention edits toward answers[0], "
                                "but the record has no 'answers'")
        out.append(dataclasses.replace(req, target_new=req.target_true, target_true=None,
                                       neighborhood=tuple(p + "?" for p in req.neighborhood)))
    return out


def is_mend_zsre_file(path) -> bool:
    """Whether the first record of ``path`` has MEND's zsRE layout (``src`` and ``alt``)."""
    for _, record in iter_records(path):
        return isinstance(record, dict) and "src" in record and "alt" in record
    return False


def edited_convention(requests: Sequence[EditRequest], edited: Mapping[str, EditRequest]) -> str | None:
    """The convention under which the edits of ``requests`` (as read from MEND records) were
    written, from ``edited`` (edit id → the request the state applied, e.g. from its journal):
    ``"easyedit"`` when toward ``alt``, ``"memit"`` when toward ``answers[0]``.

    An applied request is this record's edit when id, prompt and subject agree (another file's
    record under the same id is not). ``None`` when no request was edited, or every edited one
    has ``alt == answers[0]``. Raises :class:`EvalDataError` when the edits mix both conventions
    or one went toward neither target.
    """
    found: dict[str, list[str]] = {}
    for req in requests:
        done = edited.get(req.id)
        if done is None or (done.prompt, done.subject) != (req.prompt, req.subject):
            continue
        kinds = [name for name, value in (("easyedit", req.target_new), ("memit", req.target_true))
                 if done.target_new == value]
        if not kinds:
            raise EvalDataError(f"edit {req.id!r} was written toward {done.target_new!r}, which is neither the "
                                f"record's alt ({req.target_new!r}) nor its answers[0] ({req.target_true!r})")
        if len(kinds) == 1:
            found.setdefault(kinds[0], []).append(req.id)
    if len(found) > 1:
        raise EvalDataError(f"the state's zsRE edits mix conventions: {found['easyedit'][:3]} toward alt, "
                            f"{found['memit'][:3]} toward answers[0]")
    return next(iter(found), None)


def resolve_convention(requested: str | None, requests: Sequence[EditRequest],
                       edited: Mapping[str, EditRequest] | None = None) -> str:
    """The convention to score ``requests`` under: the edits' own (:func:`edited_convention`), when
    ``edited`` tells it, else ``requested``, else :data:`DEFAULT_CONVENTION`.

    Raises :class:`EvalDataError` when ``requested`` is not the one the edits followed: scoring
    edits toward ``alt`` against ``answers[0]`` (or back) would measure edits that were never made.
    """
    if requested is not None and requested not in CONVENTIONS:
        raise EvalDataError(f"unknown zsRE convention {requested!r}; choose one of {', '.join(CONVENTIONS)}")
    found = edited_convention(requests, edited) if edited else None
    if requested is not None and found is not None and requested != found:
        toward = "alt" if found == "easyedit" else "answers[0]"
        raise EvalDataError(f"the state edited these zsRE records toward {toward} (the {found!r} convention); "
                            f"scoring them under {requested!r} would measure edits that were never made: "
                            f"use the {found!r} convention, or edit with the {requested!r} one's requests "
                            "(rlsedit.eval.zsre.zsre_requests)")
    return found or requested or DEFAULT_CONVENTION


def _locality_pairs(req: EditRequest) -> list[tuple[str, str]]:
    if req.neighborhood and len(req.neighborhood_answers) != len(req.neighborhood):
        raise EvalDataError(
            f"edit {req.id!r}: {len(req.neighborhood)} locality prompts but "
            f"{len(req.neighborhood_answers)} answers; zsRE locality needs one answer per prompt"
        )
    return list(zip(req.neighborhood, req.neighborhood_answers))


def locality_predictions(lm, requests: Sequence[EditRequest], *, convention: str = DEFAULT_CONVENTION,
                         batch_size: int = 16) -> dict[str, list[list[int]]]:
    """Teacher-forced argmax token ids on every locality prompt + ``loc_ans`` under ``convention``,
    keyed by request id.

    Record this on the unedited model, with the convention :func:`evaluate_zsre` will use; it is
    plain JSON (ids are ints) and can be stored.
    """
    requests = zsre_requests(requests, convention)
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
    convention: str = DEFAULT_CONVENTION,
    batch_size: int = 16,
) -> dict[str, Any]:
    """zsRE metrics of ``requests`` (as read from MEND records) on the model as it is now,
    under ``convention`` (:func:`zsre_requests`).

    Returns ``{"convention", "summary", "chance", "records", "notes"}`` (the summary names the
    convention too); each record has ``id``,
    ``edit_acc``, ``rephrase_acc``, ``locality_answer_acc`` and, when
    ``pre_edit_locality`` (from :func:`locality_predictions`) is given, ``locality``.
    """
    if not requests:
        raise EvalDataError("evaluate_zsre needs at least one request")
    requests = zsre_requests(requests, convention)
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
    summary: dict[str, Any] = {"convention": convention, "requests": len(records)}
    for key in keys:
        values = [r[key] for r in records if r[key] is not None]
        summary[key] = _mean(values)
        summary[f"{key}_n"] = len(values)
    chance = {key: 1.0 / len(lm.tokenizer) for key in ("edit_acc", "rephrase_acc", "locality_answer_acc")}
    notes = ["token accuracy, teacher forced (MEND/EasyEdit)",
             f"convention {convention!r}: " + ("edits toward answers[0], '?' after locality prompts (MEMIT/AlphaEdit/RLSEdit)"
                                              if convention == "memit" else "edits toward alt, locality prompts as given (EasyEdit)")]
    if pre_edit_locality is None:
        notes.append("locality needs pre-edit predictions (locality_predictions); only locality_answer_acc "
                     "(accuracy against loc_ans) is reported")
    return {"convention": convention, "summary": summary, "chance": chance, "records": records, "notes": notes}
