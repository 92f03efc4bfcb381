"""Edit requests: the one type every editor, evaluator and the CLI agrees on.

Accepted record layouts (one JSON object each, from a ``.jsonl`` file or a ``.json`` list):

* ours:         ``{"id"?, "prompt", "subject", "target_new", "target_true"?}`` where
                ``prompt`` holds ``{}`` for the subject or contains the subject verbatim;
* ROME/MEMIT:   ``{"case_id", "requested_rewrite": {"prompt", "subject", "target_new": {"str"},
                "target_true": {"str"}}, "paraphrase_prompts", "neighborhood_prompts", ...}``;
* MEND/EasyEdit CounterFact: ``{"case_id", "prompt", "subject", "target_new", "ground_truth",
                "rephrase_prompt", "locality_prompt", "locality_ground_truth"}``;
* MEND zsRE:    ``{"subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans"}``;
* MQuAKE:       ``{"case_id", "requested_rewrite": [{"prompt", "subject", "target_new": {"str"},
                "target_true": {"str"}}, ...], "questions", "new_answer", ...}``: one edit per
                rewrite, id ``"<case_id>.<j>"`` (:func:`parse_mquake_case`); in a file, a rewrite an
                earlier case already makes is applied once, and the same prompt set to another
                target is refused (one model cannot hold both).

Parsing never guesses silently: a record that fits none of them raises
:class:`~rlsedit.errors.InvalidRequestError` naming the record and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .errors import InvalidRequestError

SUBJECT_SLOT = "{}"


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.replace("{}", subject)`` should continue with ``target_new``.

    Attributes:
        id: stable identifier (journal key, undo handle); the record's own id or ``case_id``,
            else its position in the file.
        prompt: template with exactly one ``{}`` where the subject goes.
        subject: the entity whose fact changes; keys are read at its last token.
        target_new: the new object, without a leading space (tokenizers add it, see
            :func:`target_text`).
        target_true: the old object, when the record knows it (evaluation only).
        paraphrases: full prompts that should also yield ``target_new`` (generalization).
        neighborhood: full prompts about other subjects that must keep their answer.
        neighborhood_answers: the answer each neighborhood prompt should keep (may be empty
            when the layout only knows ``target_true``).
        generation_prompts: free-text prompts for fluency/consistency (ROME layout only).
    """

    id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace(SUBJECT_SLOT, self.subject)

    def to_record(self) -> dict[str, Any]:
        """Our own JSON layout (what the journal stores); :func:`parse_request` reads it back."""
        rec: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
        }
        if self.target_true is not None:
            rec["target_true"] = self.target_true
        for name in ("paraphrases", "neighborhood", "neighborhood_answers", "generation_prompts"):
            value = getattr(self, name)
            if value:
                rec[name] = list(value)
        return rec


def target_text(target: str) -> str:
    """The string to tokenize for a target: one leading space, as ROME/MEMIT do."""
    return target if target.startswith(" ") else " " + target


def _check_text(value: str, key: str, where: str) -> str:
    """Refuse a string that is not Unicode text: JSON's ``\ud800`` escapes decode to lone
    surrogates, which no tokenizer (nor the UTF-8 journal) can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{where}: field {key!r} is not valid Unicode text ({exc.reason} at position {exc.start})") from None
    return value


def _require_str(record: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise InvalidRequestError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidRequestError(f"{where}: field {key!r} is empty")
    return _check_text(value, key, where)


def _str_list(record: dict, key: str, where: str) -> tuple[str, ...]:
    value = record.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError(f"{where}: field {key!r} must be a string or a list of strings")
    return tuple(_check_text(v, key, where) for v in value)


def _template(prompt: str, subject: str, where: str) -> str:
    """Turn a prompt into a ``{}`` template: keep a slot, or cut the subject out verbatim."""
    slots = prompt.count(SUBJECT_SLOT)
    if slots > 1:
        raise InvalidRequestError(f"{where}: prompt has {slots} '{{}}' slots, expected one: {prompt!r}")
    if slots == 1:
        return prompt
    pos = prompt.find(subject)
    if pos < 0:
        raise InvalidRequestError(
            f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; "
            "put '{}' where the subject goes or include it verbatim"
        )
    return prompt[:pos] + SUBJECT_SLOT + prompt[pos + len(subject):]


def _target(value: Any, key: str, where: str) -> str:
    if isinstance(value, dict):  # ROME: {"str": ..., "id": ...}
        value = value.get("str")
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # zsRE "answers": the first is the reference
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    value = value.strip()
    if not value:
        raise InvalidRequestError(f"{where}: {key!r} is empty")
    return _check_text(value, key, where)


def parse_request(record: Any, index: int = 0) -> EditRequest:
    """Build an :class:`EditRequest` from one record in any accepted layout.

    ``index`` is the record's position; it names the record in errors and serves as id
    when the record has none.
    """
    where = f"edit #{index}"
    if not isinstance(record, dict):
        raise InvalidRequestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    rec_id = record.get("id", record.get("case_id", index))
    if not isinstance(rec_id, (str, int)) or isinstance(rec_id, bool):
        raise InvalidRequestError(f"{where}: 'id' must be a string or an integer, got {rec_id!r}")
    rec_id = _check_text(str(rec_id), "id", where)
    where = f"edit #{index} (id {rec_id})"

    if "requested_rewrite" in record:  # ROME / MEMIT CounterFact
        rw = record["requested_rewrite"]
        if isinstance(rw, list):  # MEMIT allows a list; one rewrite per record here
            if len(rw) != 1:
                also = (" (an MQuAKE case: read it with parse_records or read_requests, one edit per rewrite)"
                        if is_mquake_case(record) else "")
                raise InvalidRequestError(f"{where}: expected one requested_rewrite, got {len(rw)}{also}")
            rw = rw[0]
        rewrite = _rewrite(rw, rec_id, where)
        neighborhood = _str_list(record, "neighborhood_prompts", where)
        target_true = rewrite.target_true
        return EditRequest(
            id=rec_id, prompt=rewrite.prompt, subject=rewrite.subject, target_new=rewrite.target_new,
            target_true=target_true,
            paraphrases=_str_list(record, "paraphrase_prompts", where),
            neighborhood=neighborhood,
            neighborhood_answers=(target_true,) * len(neighborhood) if target_true else (),
            generation_prompts=_str_list(record, "generation_prompts", where),
        )

    if "src" in record and "alt" in record:  # MEND zsRE
        subject = _require_str(record, "subject", where)
        prompt = _template(_require_str(record, "src", where), subject, where)
        loc = _str_list(record, "loc", where)
        loc_ans = _str_list(record, "loc_ans", where)
        return EditRequest(
            id=rec_id, prompt=prompt, subject=subject,
            target_new=_target(record["alt"], "alt", where),
            target_true=_target(record["answers"], "answers", where) if record.get("answers") else None,
            paraphrases=_str_list(record, "rephrase", where),
            neighborhood=loc, neighborhood_answers=loc_ans,
        )

    subject = _require_str(record, "subject", where)
    prompt = _template(_require_str(record, "prompt", where), subject, where)
    if "target_new" not in record:
        raise InvalidRequestError(f"{where}: missing field 'target_new'")
    target_new = _target(record["target_new"], "target_new", where)
    true_key = "target_true" if "target_true" in record else "ground_truth"
    target_true = _target(record[true_key], true_key, where) if true_key in record else None
    paraphrases = _str_list(record, "paraphrases", where) or _str_list(record, "rephrase_prompt", where)
    neighborhood = _str_list(record, "neighborhood", where) or _str_list(record, "locality_prompt", where)
    answers = _str_list(record, "neighborhood_answers", where) or _str_list(record, "locality_ground_truth", where)
    return EditRequest(
        id=rec_id, prompt=prompt, subject=subject, target_new=target_new, target_true=target_true,
        paraphrases=paraphrases, neighborhood=neighborhood, neighborhood_answers=answers,
        generation_prompts=_str_list(record, "generation_prompts", where),
    )


def _rewrite(rw: Any, rec_id: str, where: str) -> EditRequest:
    """One ROME-layout rewrite ``{"prompt", "subject", "target_new": {"str"}, "target_true"?: {"str"}}``."""
    if not isinstance(rw, dict):
        raise InvalidRequestError(f"{where}: 'requested_rewrite' must be an object")
    subject = _require_str(rw, "subject", where)
    prompt = _template(_require_str(rw, "prompt", where), subject, where)
    if "target_new" not in rw:
        raise InvalidRequestError(f"{where}: missing field 'target_new'")
    target_new = _target(rw["target_new"], "target_new", where)
    target_true = _target(rw["target_true"], "target_true", where) if "target_true" in rw else None
    return EditRequest(id=rec_id, prompt=prompt, subject=subject, target_new=target_new, target_true=target_true)


def is_mquake_case(record: Any) -> bool:
    """An MQuAKE case: a list of rewrites and the multi-hop ``questions`` that need them."""
    return isinstance(record, dict) and isinstance(record.get("requested_rewrite"), list) and "questions" in record


def parse_mquake_case(record: Any, index: int = 0) -> list[EditRequest]:
    """The rewrites of one MQuAKE case as edit requests, ids ``"<case_id>.<j>"`` (``j`` the
    rewrite's position). Errors name the case and the rewrite's field."""
    case_id = record.get("case_id", index) if isinstance(record, dict) else index
    if not isinstance(case_id, (str, int)) or isinstance(case_id, bool):
        raise InvalidRequestError(f"MQuAKE case #{index}: 'case_id' must be a string or an integer, got {case_id!r}")
    where = f"MQuAKE case #{index} (case_id {case_id})"
    if not is_mquake_case(record):
        raise InvalidRequestError(f"{where}: expected 'requested_rewrite' as a list and 'questions'")
    rewrites = record["requested_rewrite"]
    if not rewrites:
        raise InvalidRequestError(f"{where}: 'requested_rewrite' is an empty list")
    return [_rewrite(rw, f"{case_id}.{j}", f"{where}, requested_rewrite[{j}]") for j, rw in enumerate(rewrites)]


def parse_records(record: Any, index: int = 0) -> list[EditRequest]:
    """The edit requests of one record: one for every layout, one per rewrite of an MQuAKE case."""
    return parse_mquake_case(record, index) if is_mquake_case(record) else [parse_request(record, index)]


def _file_requests(record: Any, index: int, made: Mapping[tuple[str, str], EditRequest]
                   ) -> tuple[list[EditRequest], dict[tuple[str, str], EditRequest]]:
    """:func:`parse_records` for a record of a file, and what to add to ``made`` once the caller
    accepts it. ``made`` maps ``(prompt, subject)`` to the MQuAKE rewrites of earlier cases: one
    made again is left out, one to another target raises (other layouts add nothing to it)."""
    requests = parse_records(record, index)
    if not is_mquake_case(record):
        return requests, {}
    new: dict[tuple[str, str], EditRequest] = {}
    for request in requests:
        key = (request.prompt, request.subject)
        prior = made.get(key) or new.get(key)
        if prior is None:
            new[key] = request
        elif prior.target_new != request.target_new:
            raise InvalidRequestError(
                f"MQuAKE case #{index}: rewrite {request.id!r} sets {request.text!r} to {request.target_new!r}, "
                f"but rewrite {prior.id!r} sets it to {prior.target_new!r}; one model cannot hold both "
                "(edit such cases into separate states, or drop one)")
    return list(new.values()), new


def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, record)`` from a ``.jsonl`` file or a ``.json`` list/object."""
    for index, record in _iter_lines(path):
        if isinstance(record, InvalidRequestError):
            raise record
        yield index, record


def _iter_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """:func:`iter_records`, with an unparsable line of a ``.jsonl`` file yielded as its
    :class:`InvalidRequestError` instead of raised (a whole unreadable file still raises)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"edit file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"edit file {str(path)!r} is not UTF-8 text: {exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise InvalidRequestError(f"edit file {str(path)!r}: invalid JSON: {exc}") from None
        yield from enumerate(data)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            record = InvalidRequestError(f"edit file {str(path)!r} line {lineno}: invalid JSON: {exc}")
        yield lineno - 1, record


def read_requests(path: str | Path, *, limit: int | None = None) -> list[EditRequest]:
    """Parse every record of an edit file; the first bad one raises, naming its line. ``limit``
    counts records (an MQuAKE case is one record of several edits)."""
    out: list[EditRequest] = []
    made: dict[tuple[str, str], EditRequest] = {}
    for count, (index, record) in enumerate(iter_records(path)):
        if limit is not None and count >= limit:
            break
        requests, new = _file_requests(record, index, made)
        made.update(new)
        out.extend(requests)
    check_unique_ids(out)
    return out


def read_requests_skipping_bad(path: str | Path, *, limit: int | None = None
                               ) -> tuple[list[EditRequest], list[dict[str, str]]]:
    """:func:`read_requests` that leaves out each record it cannot use (invalid JSON line,
    missing or empty field, an id seen before) and reports it: ``(requests, skipped)`` with
    ``skipped = [{"id", "error"}]`` (the id is the record's position when it has none)."""
    out: list[EditRequest] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    made: dict[tuple[str, str], EditRequest] = {}
    for count, (index, record) in enumerate(_iter_lines(path)):
        if limit is not None and count >= limit:
            break
        try:
            if isinstance(record, InvalidRequestError):
                raise record
            requests, new = _file_requests(record, index, made)
            for request in requests:
                if request.id in seen:
                    raise InvalidRequestError(f"edit id {request.id!r} occurs twice; ids must be unique")
        except InvalidRequestError as exc:
            rec_id = record.get("id", record.get("case_id", index)) if isinstance(record, dict) else index
            skipped.append({"id": str(rec_id), "error": str(exc)})
            continue
        made.update(new)  # only once the whole record is accepted
        seen.update(r.id for r in requests)
        out.extend(requests)
    return out, skipped


def check_unique_ids(requests: Iterable[EditRequest]) -> None:
    seen: set[str] = set()
    for req in requests:
        if req.id in seen:
            raise InvalidRequestError(f"edit id {req.id!r} occurs twice; ids must be unique")
        seen.add(req.id)


def as_requests(items: Any, *, start: int = 0) -> list[EditRequest]:
    """Edit requests from what a caller has: :class:`EditRequest` s, dicts in any layout
    :func:`parse_request` reads, or a single one of either. A dict without an id is numbered
    ``start + its position``. All are parsed before anything is used, so a bad one raises
    and nothing is applied."""
    if isinstance(items, (EditRequest, dict)):
        items = [items]
    elif isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise InvalidRequestError(
            f"expected edit requests (EditRequest objects or dicts, or a list of them), got {type(items).__name__}")
    return [item if isinstance(item, EditRequest) else parse_request(item, start + i)
            for i, item in enumerate(items)]
