"""The one JSON spelling of a state directory, and strict parsing of it.

Written: indent 2, sorted keys, UTF-8, no NaN/Infinity (:func:`dumps_json`). Values given by
callers are stored as their JSON round trip (:func:`to_json_value`): tuples come back as
lists; anything JSON cannot hold faithfully (non-str keys, NaN, objects) is refused.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import StateError


def dumps_json(obj: Any, *, compact: bool = False) -> str:
    """``obj`` as canonical JSON text (indent 2 + final newline, or one compact line).

    Raises :class:`~rlsedit.errors.StateError` if ``obj`` is not representable in JSON.
    """
    try:
        if compact:
            return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError, RecursionError) as exc:
        raise StateError(
            f"cannot store {type(obj).__name__} value as JSON (allowed: dict with str keys, list, "
            f"tuple, str, int, finite float, bool, None): {exc}"
        ) from exc


def _check_key_types(obj: Any, where: str) -> None:
    # json.dumps silently turns int/float/bool/None keys into strings; refuse instead
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise StateError(f"cannot store {where}: dict key {key!r} is not a str")
            _check_key_types(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _check_key_types(value, f"{where}[{index}]")


def to_json_value(obj: Any, *, what: str) -> Any:
    """The JSON round trip of ``obj``: exactly what a later read of it returns."""
    _check_key_types(obj, what)
    return json.loads(dumps_json(obj, compact=True))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows a float")
    return value


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN/Infinity. Raises ValueError/RecursionError on bad text."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_parse_finite_float)


def decimal_count(text: str) -> int | None:
    """``text`` as a non-negative int if it is written canonically (ASCII digits, no sign or
    leading zero), else None: counters in file metadata have exactly one spelling."""
    if text.isascii() and text.isdigit() and str(int(text)) == text:
        return int(text)
    return None


def json_object(text: str) -> dict[str, Any]:
    """The JSON object ``text`` holds; ValueError saying what it is instead."""
    try:
        value = loads_json(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("is not a JSON object")
    return value
