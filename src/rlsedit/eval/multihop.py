"""Multi-hop questions (MQuAKE, Zhong et al., 2023): does the edited model use a new fact when a
question needs it as one step of several?

An MQuAKE case edits one to four facts (``requested_rewrite``, a list of ROME-layout rewrites)
and asks three wordings of one multi-hop question (``questions``) whose answer changes with
them: ``new_answer`` (and ``new_answer_alias``) after the edits, ``answer`` (and
``answer_alias``) before. :func:`read_multihop` reads such a file a user supplies;
:func:`evaluate_multihop` scores the model **as it is**: evaluation applies no edit, so the
model (the state) must already carry the file's rewrites — ``rlsedit edit --edits FILE`` reads
the same file, one edit per rewrite (:func:`rlsedit.requests.parse_mquake_case`).

Each question is asked twice, decoded greedily as the other generation metrics
(:mod:`rlsedit.eval.generation`: stop at ``"."``, a newline or EOS, a token cap):

* **raw** — ``"Question: <question>\\nAnswer:"`` (:data:`RAW_QUESTION`): a bare question is
  often continued by another question, so the raw prompt names where the answer goes;
* **chat** — the question as the user turn of the tokenizer's chat template
  (:func:`~rlsedit.eval.generation.chat_prompt`), when the model has one.

An answer *begins with* / *mentions* the new answer when it does so for ``new_answer`` or any
alias (SQuAD-normalised words); *old mentions*: it still mentions ``answer`` or an alias.
Per-question means, and per case as MQuAKE counts it: a case is answered when any of its
questions is (``*_case_mentions``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError
from ..requests import EditRequest, is_mquake_case, iter_records, parse_mquake_case
from .datafiles import EvalDataError
from .generation import (STOP_STRINGS, GenerationConfig, begins_with, chat_enabled, chat_prompt, format_samples,
                         interleave_samples, mentions, sample_positions)
from .decoding import greedy_generate

RAW_QUESTION = "Question: {}\nAnswer:"
"""The raw prompt of a question: ``{}`` takes the question."""

SAMPLE_KINDS = ("multihop", "multihop chat")


@dataclass(frozen=True)
class MultiHopCase:
    """One MQuAKE case.

    Attributes:
        id: the case's ``case_id`` (else its position in the file).
        requests: its rewrites as edit requests (what the edited state must carry).
        questions: the multi-hop questions (MQuAKE: three wordings of one).
        new_answers: ``new_answer`` then its aliases: the answer after the edits.
        old_answers: ``answer`` then its aliases: the answer before them.
    """

    id: str
    requests: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    new_answers: tuple[str, ...]
    old_answers: tuple[str, ...]


def _strings(record: dict, key: str, where: str, *, required: bool) -> tuple[str, ...]:
    if key not in record:
        if required:
            raise EvalDataError(f"{where}: missing field {key!r}")
        return ()
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise EvalDataError(f"{where}: field {key!r} must be a list of non-empty strings, got {value!r}")
    if required and not value:
        raise EvalDataError(f"{where}: field {key!r} is an empty list")
    return tuple(value)


def _answer(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise EvalDataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def parse_multihop_case(record: Any, index: int, source: str = "multi-hop file") -> MultiHopCase:
    """One MQuAKE case; errors name ``source``, the case and the bad field."""
    where = f"{source}: case #{index}"
    if not is_mquake_case(record):
        raise EvalDataError(f"{where}: not an MQuAKE case (needs 'requested_rewrite' as a list of rewrites "
                            "and 'questions')")
    try:
        requests = parse_mquake_case(record, index)
    except InvalidRequestError as exc:
        raise EvalDataError(f"{source}: {exc}") from None
    where = f"{where} (case_id {record.get('case_id', index)})"
    return MultiHopCase(
        id=str(record.get("case_id", index)),
        requests=tuple(requests),
        questions=_strings(record, "questions", where, required=True),
        new_answers=(_answer(record, "new_answer", where), *_strings(record, "new_answer_alias", where, required=False)),
        old_answers=(_answer(record, "answer", where), *_strings(record, "answer_alias", where, required=False)),
    )


def read_multihop(path: str | Path, *, limit: int | None = None) -> list[MultiHopCase]:
    """The cases of an MQuAKE-layout file (a JSON list, or JSON lines), the first ``limit`` of
    them; every case is checked before any is returned."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise EvalDataError(f"limit must be a positive integer or None, got {limit!r}")
    source = f"multi-hop file {str(path)!r}"
    cases: list[MultiHopCase] = []
    try:
        for index, record in iter_records(path):
            if limit is not None and len(cases) >= limit:
                break
            cases.append(parse_multihop_case(record, index, source))
    except InvalidRequestError as exc:  # the file itself: missing, not UTF-8, not JSON
        raise EvalDataError(str(exc).replace("edit file", "multi-hop file", 1)) from None
    if not cases:
        raise EvalDataError(f"{source} holds no cases")
    ids = [case.id for case in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise EvalDataError(f"{source}: case_id {repeated[0]!r} occurs twice; case ids must be unique")
    return cases


def _scores(generation: str, case: MultiHopCase) -> dict[str, Any]:
    return {"generation": generation,
            "new_begins": any(begins_with(generation, a) for a in case.new_answers),
            "new_mentions": any(mentions(generation, a) for a in case.new_answers),
            "old_mentions": any(mentions(generation, a) for a in case.old_answers)}


def _mean(values: Sequence[bool]) -> float | None:
    return statistics.fmean(float(v) for v in values) if values else None


def evaluate_multihop(lm, cases: Sequence[MultiHopCase], config: GenerationConfig = GenerationConfig()
                      ) -> dict[str, Any]:
    """Ask every question of ``cases`` (a seeded sample of ``config.n`` cases when set) raw and
    through the chat template, and score the answers (see the module docstring).

    Returns ``{"summary", "counts", "records", "samples", "settings", "notes"}`` like
    :func:`~rlsedit.eval.generation.evaluate_generation`; ``summary`` fractions are ``None``
    where nothing was scored (``chat_*`` without a chat template).
    """
    if not cases:
        raise EvalDataError("evaluate_multihop needs at least one case")
    positions = sample_positions(len(cases), config.n, config.seed)
    chat = chat_enabled(lm, config)
    questions = list(dict.fromkeys(q for i in positions for q in cases[i].questions))
    raw = dict(zip(questions, greedy_generate(lm, [RAW_QUESTION.format(q) for q in questions], config.max_new_tokens,
                                              stop=STOP_STRINGS, batch_size=config.batch_size)))
    chatted: dict[str, str] = {}
    if chat:
        chatted = dict(zip(questions, greedy_generate(lm, [chat_prompt(lm.tokenizer, q) for q in questions],
                                                      config.chat_max_new_tokens, stop=STOP_STRINGS,
                                                      batch_size=config.batch_size)))
    records = []
    for i in positions:
        case = cases[i]
        asked = []
        for q in case.questions:
            row: dict[str, Any] = {"question": q, "raw": _scores(raw[q], case)}
            if chat:
                row["chat"] = _scores(chatted[q], case)
            asked.append(row)
        records.append({"position": i, "id": case.id, "edits": [r.id for r in case.requests],
                        "new_answers": list(case.new_answers), "old_answers": list(case.old_answers),
                        "questions": asked})

    summary: dict[str, float | None] = {}
    for mode in ("raw", "chat"):
        rows = [q[mode] for rec in records for q in rec["questions"] if mode in q]
        summary[f"{mode}_begins"] = _mean([r["new_begins"] for r in rows])
        summary[f"{mode}_mentions"] = _mean([r["new_mentions"] for r in rows])
        summary[f"{mode}_old_mentions"] = _mean([r["old_mentions"] for r in rows])
        summary[f"{mode}_case_mentions"] = (
            _mean([any(q[mode]["new_mentions"] for q in rec["questions"]) for rec in records]) if rows else None)
    notes = [
        "the model is scored as it is: evaluation applies none of the file's rewrites, so the state must have "
        "been edited with them (rlsedit edit --edits FILE)",
        f"raw prompt {RAW_QUESTION!r}; greedy decoding, stop at {STOP_STRINGS!r} or EOS, at most "
        f"{config.max_new_tokens} tokens ({config.chat_max_new_tokens} for chat answers); begins/mentions: the "
        "new answer or any alias, SQuAD-normalised; old: the pre-edit answer or any alias",
        "case_mentions: a case counts when any of its questions mentions the new answer (MQuAKE's case accuracy)",
        "chat: each question as the user turn of the tokenizer's chat template" if chat else
        "chat: not measured (" + ("turned off" if config.chat is False else "the tokenizer has no chat template") + ")",
    ]
    return {
        "summary": summary,
        "counts": {"cases": len(records), "cases_total": len(cases),
                   "questions": sum(len(rec["questions"]) for rec in records),
                   "rewrites": sum(len(rec["edits"]) for rec in records)},
        "records": records,
        "samples": multihop_samples(records, config.samples, seed=config.seed),
        "settings": {"max_new_tokens": config.max_new_tokens, "chat_max_new_tokens": config.chat_max_new_tokens,
                     "n": config.n, "seed": config.seed, "chat": chat, "raw_prompt": RAW_QUESTION,
                     "stop": list(STOP_STRINGS)},
        "notes": notes,
    }


def _verdict(scores: dict[str, Any]) -> str:
    said = "begins" if scores["new_begins"] else "mentions" if scores["new_mentions"] else "misses"
    return f"{said} (old: {'mentions' if scores['old_mentions'] else 'misses'})"


def multihop_samples(records: Sequence[dict[str, Any]], count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``count`` ``{"kind", "id", "prompt", "generation", "target", "verdict"}`` rows, raw and
    chat answers in turn (the rows :func:`~rlsedit.eval.generation.format_samples` prints)."""
    by_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SAMPLE_KINDS}
    for rec in records:
        for q in rec["questions"]:
            for kind, mode in zip(SAMPLE_KINDS, ("raw", "chat")):
                if mode in q:
                    by_kind[kind].append({"kind": kind, "id": rec["id"], "prompt": q["question"],
                                          "generation": q[mode]["generation"], "target": rec["new_answers"][0],
                                          "verdict": _verdict(q[mode])})
    return interleave_samples(by_kind, count, seed=seed)


# the result lines reports print: (summary key, label)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("raw_begins", "multi-hop says it (raw)"),
    ("raw_mentions", "multi-hop mentions (raw)"),
    ("raw_case_mentions", "multi-hop cases answered (raw)"),
    ("raw_old_mentions", "multi-hop still says old (raw)"),
    ("chat_mentions", "multi-hop mentions (chat)"),
    ("chat_case_mentions", "multi-hop cases answered (chat)"),
    ("chat_old_mentions", "multi-hop still says old (chat)"),
)


def format_multihop(result: dict[str, Any]) -> list[str]:
    """The multi-hop figures, notes and sample rows as printable lines."""
    counts = result["counts"]
    lines = [f"multihop ({counts['cases']} of {counts['cases_total']} cases, {counts['questions']} questions):"]
    for key, label in COLUMNS:
        value = result["summary"].get(key)
        lines.append(f"  {label}: " + ("–" if value is None else f"{value:.4f}"))
    lines += [f"  note: {note}" for note in result["notes"]]
    return lines + ["", "multihop samples:", *format_samples(result["samples"]), ""]
