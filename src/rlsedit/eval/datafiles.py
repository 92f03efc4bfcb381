"""Reading evaluation data files (JSON, JSON lines, gzip JSON lines) with clear errors.

Every loader in :mod:`rlsedit.eval` takes a path and reads it through these helpers, so a
missing file, a bad line or a missing field fails the same way: :class:`EvalDataError`
naming the file, the line and the field.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

from ..errors import RLSEditError


class EvalDataError(RLSEditError, ValueError):
    """An evaluation data file or an evaluation argument is unusable (missing, malformed,
    a field absent, a count out of range)."""


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a :class:`Path` if it is a regular file, else raise naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{what} file {str(path)!r} does not exist (pass the path to the data file)")
    return path


def read_jsonl(path: str | Path, what: str) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (``.gz`` is decompressed); blank lines are skipped."""
    path = require_file(path, what)
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[dict[str, Any]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalDataError(f"{what} file {str(path)!r} line {lineno}: invalid JSON: {exc}") from None
                if not isinstance(record, dict):
                    raise EvalDataError(
                        f"{what} file {str(path)!r} line {lineno}: expected a JSON object, "
                        f"got {type(record).__name__}"
                    )
                records.append(record)
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise EvalDataError(f"{what} file {str(path)!r} cannot be read: {exc}") from None
    return records


def read_json_list(path: str | Path, what: str) -> list[dict[str, Any]]:
    """A ``.json`` file holding a list of objects."""
    path = require_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalDataError(f"{what} file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise EvalDataError(f"{what} file {str(path)!r}: expected a JSON list of objects")
    return data


def field(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``record[key]`` checked to be of ``kind``; raise naming ``where`` and ``key`` otherwise."""
    if key not in record:
        raise EvalDataError(f"{where}: missing field {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; a JSON true is never a valid label index or count
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise EvalDataError(f"{where}: field {key!r} has type {type(value).__name__}, expected {kind}")
    return value


def check_count(value: int | None, name: str) -> None:
    """Refuse a count (``n``, ``limit``, ``k``) that is not a positive integer (``None`` = all)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise EvalDataError(f"{name} must be a positive integer or None, got {value!r}")


def subsample(total: int, n: int | None, seed: int) -> list[int]:
    """Indices of ``n`` items out of ``total``: a seeded uniform sample, returned in file order.

    Used where files are sorted (MMLU by subject), so the first ``n`` would not be
    representative. ``n=None`` or ``n >= total`` returns every index.
    """
    check_count(n, "n")
    if n is None or n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))
