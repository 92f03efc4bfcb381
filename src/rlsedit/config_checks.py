"""Checks of configuration values, shared by every config dataclass.

Each returns the value, normalised (an int kept an int, a number made a float, a sequence a
tuple), or raises :class:`~rlsedit.errors.InvalidRequestError` naming the field and the
value. Raising it from the dataclass itself gives the library, ``rlsedit edit --hparams`` and
the ``bench`` commands the same one-line refusal (exit code 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import InvalidRequestError


def check_int(name: str, value: Any, *, at_least: int) -> int:
    """An int (not a bool) ``>= at_least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        raise InvalidRequestError(f"{name} must be an integer >= {at_least}, got {value!r}")
    return value


def check_number(name: str, value: Any, *, positive: bool = False, optional: bool = False) -> float | None:
    """A finite real number ``>= 0`` (``> 0`` when ``positive``); None too when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        also = " or None" if optional else ""
        raise InvalidRequestError(f"{name} must be a finite number {bound}{also}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise InvalidRequestError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
