"""Preservation rows: prompts of an edit's own template filled with *other* subjects, whose
layer output the edit should leave as it is.

A request's keys ``k = k_t + k_s`` share the template's component ``k_t`` with the keys of the
same prompt about any other subject, so an update that maps ``k`` to a new value also moves
those. Preservation rows add, per request, ``count`` keys ``K_p (d_k, count)`` of the same
template with other subjects and, as targets, the layer's current output ``V_p = K_pᵀW``
("leave these unchanged") to the batch's least-squares problem, weighted by ``w``:

    Σ‖KᵀW − V‖² + w‖K_pᵀW − V_p‖²   =   ‖[K, √w K_p]ᵀW − [V; √w V_p]‖²          (d_k × (u + u·count))

so they are columns of the same solve and, for RLSEdit, rows of its memory like any other
(the exact recursion is unchanged: they are more data). With a post-MLP norm (Gemma 3) the
stream receives ``norm(v)``; an unchanged ``v`` leaves it unchanged, so ``V_p = K_pᵀW`` needs
no fit through the norm.

Storage (:class:`~rlsedit.editors.record.EditRecord`, and so the journal and the history of
:meth:`~rlsedit.editors.base.Editor.save_pretrained`): the edit's own ``layers.<l>.K`` /
``layers.<l>.V`` stay as they are (one column per edit: counts, undo columns and the live
index are unchanged), and the preservation rows are stored beside them, already scaled by
``√w``, as ``layers.<l>.Kp (d_k, u·count)`` and ``layers.<l>.Vp (u·count, d_v)``, request-major
(request ``i`` owns columns ``i·count .. (i+1)·count − 1``). A replay solves with both and
needs no config; undoing edit ``i`` downdates its own column together with its ``count``
preservation columns, since they were added for it.

Where in the prompt (``preserve_positions``): by default a preservation prompt gives one row,
at its subject's last token, where the edit's own key is read. But ΔW applies at every position,
and a prompt's continuation reads every earlier position's layer output through attention
(``benchmarks/quality/neighbour_positions.py`` masks ΔW by position to see where a change
arrives). With ``preserve_positions = P`` each prompt gives ``P`` rows instead, its last ``P``
positions (:class:`~rlsedit.locate.keys.PromptKeys`; zero rows where it is shorter), so every
request owns ``count·P`` columns of ``Kp``/``Vp`` above, the layout and undo unchanged, and the
stored rows grow ``P``-fold.

Which subjects: a pool of names (:func:`load_subject_pool`; by default the page titles of
the corpus bundled with the package), from which each request draws ``count`` distinct ones
other than its own subject (case-insensitive), seeded by the config's seed and the request
id (:func:`draw_subjects`), so a rerun of the same request gets the same ones.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError
from ..requests import SUBJECT_SLOT, EditRequest
from .corpus import bundled_corpus
from .tokens import request_template

_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December")
# "October 25", "25 October", "October 1995", "1995", "1990s", "44 BC": a date, not a subject
_DATE_RE = re.compile(rf"^(?:(?:{_MONTHS})(?: \d{{1,4}})?|\d{{1,2}} (?:{_MONTHS})|\d{{1,4}}s?(?: (?:BC|AD|BCE|CE))?)$")
_TRAILING_PARENTHETICAL_RE = re.compile(r"\s*\([^()]*\)\s*$")


def clean_title(title: str) -> str | None:
    """A page title as a subject: a trailing parenthetical dropped ("Dark Angel (British TV
    series)" → "Dark Angel"); None for lists ("List of …") and pure dates ("October 25")."""
    name = _TRAILING_PARENTHETICAL_RE.sub("", title).strip()
    if not name or name.startswith("List of") or _DATE_RE.match(name):
        return None
    return name


def _dedupe(names: Sequence[str]) -> list[str]:
    """Non-empty names without a ``{}`` slot, first occurrence kept, compared case-insensitively
    (a draw excludes the request's subject case-insensitively, so the pool counts that way)."""
    seen, out = set(), []
    for name in names:
        name = name.strip()
        if not name or SUBJECT_SLOT in name or name.casefold() in seen:
            continue
        seen.add(name.casefold())
        out.append(name)
    return out


def _records(path: Path) -> list[Any]:
    """The JSON values of a ``.jsonl`` file (one a line) or the list of a ``.json`` file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"preserve_subjects file {str(path)!r} cannot be read: {exc}") from None
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise InvalidRequestError(f"preserve_subjects file {path}:{lineno}: not valid JSON ({exc})") from None
        return out
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"preserve_subjects file {str(path)!r}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise InvalidRequestError(
            f"preserve_subjects file {str(path)!r}: expected a JSON list (of strings, or of records with a "
            f"\"subject\" or \"title\" field), got a {type(data).__name__}")
    return data


def _name_of(record: Any, where: str) -> str | None:
    """A string as is; a record's ``"subject"`` as is, or its ``"title"`` cleaned (:func:`clean_title`)."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("subject"), str):
            return record["subject"]
        if isinstance(record.get("title"), str):
            return clean_title(record["title"])
    raise InvalidRequestError(
        f"{where}: expected a string or a record with a string \"subject\" or \"title\" field, got {record!r:.80}")


def load_subject_pool(path: str | Path | None = None) -> list[str]:
    """The subjects preservation rows draw from, in file order, deduplicated.

    ``None``: the page titles of the corpus bundled with the package, cleaned
    (:func:`clean_title`). A file: a JSON list of strings, or JSON/JSONL records with a
    ``"subject"`` field (ROME's ``known_1000.json``) or a ``"title"`` field (cleaned). An
    unreadable or malformed file, or one that yields no subject, raises
    :class:`~rlsedit.errors.InvalidRequestError` naming it.
    """
    source = bundled_corpus() if path is None else Path(path).expanduser()
    if path is not None and not source.is_file():
        raise InvalidRequestError(
            f"preserve_subjects file {str(source)!r} does not exist; pass a JSON list of subjects, JSON/JSONL records "
            "with a \"subject\" or \"title\" field, or None for the titles of the bundled corpus")
    names = [_name_of(r, f"preserve_subjects file {source}, entry #{i}") for i, r in enumerate(_records(source))]
    pool = _dedupe([n for n in names if n is not None])
    if not pool:
        raise InvalidRequestError(f"preserve_subjects: {str(source)!r} holds no usable subject")
    return pool


def check_pool_size(pool: Sequence[str], count: int, source: str | Path | None) -> None:
    """Refuse a pool too small for ``count`` draws that exclude the request's own subject."""
    if len(pool) < count + 1:
        where = "the bundled corpus titles" if source is None else repr(str(source))
        raise InvalidRequestError(
            f"preserve_count={count} needs at least {count + 1} distinct subjects (one may be the edit's own), "
            f"but {where} hold {len(pool)}; lower preserve_count or give a larger preserve_subjects file")


def draw_subjects(pool: Sequence[str], request: EditRequest, count: int, seed: int) -> list[str]:
    """``count`` distinct subjects of ``pool`` other than ``request.subject`` (case-insensitive),
    the same for the same pool, request id and seed (sha256 of both, not Python's salted hash)."""
    own = request.subject.strip().casefold()
    candidates = [name for name in pool if name.casefold() != own]
    if len(candidates) < count:
        raise InvalidRequestError(
            f"edit {request.id!r}: preserve_count={count} but only {len(candidates)} other subjects in the pool")
    digest = hashlib.sha256(f"{seed}\0{request.id}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).sample(candidates, count)


def preservation_requests(requests: Sequence[EditRequest], pool: Sequence[str], count: int,
                          seed: int) -> list[EditRequest]:
    """Request-major pseudo-requests: request ``i``'s prompt template with each of its drawn
    subjects (ids ``"<id>#preserve<j>"``), for reading preservation keys with the bare prompt
    ``["{}"]`` as the only prefix."""
    out = []
    for request in requests:
        template = request_template(request)
        for j, subject in enumerate(draw_subjects(pool, request, count, seed)):
            out.append(EditRequest(id=f"{request.id}#preserve{j}", prompt=template, subject=subject,
                                   target_new=request.target_new))
    return out
