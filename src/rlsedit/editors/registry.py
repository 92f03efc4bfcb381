"""The editor registry: a method name (``--method``) to its editor class.

``register_editor`` is keyword-only and refuses a name twice; :mod:`rlsedit.editors` registers
the built-in editors when it is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidRequestError

if TYPE_CHECKING:
    from .base import Editor

EDITORS: dict[str, type["Editor"]] = {}


def get_editor_class(name: str) -> type["Editor"]:
    """The editor class registered as ``name`` (``--method``); an unknown name raises
    :class:`~rlsedit.errors.InvalidRequestError` listing the known ones."""
    try:
        return EDITORS[name]
    except KeyError:
        raise InvalidRequestError(f"unknown method {name!r}; choose one of: {', '.join(EDITORS)}") from None


def register_editor(*, name: str, editor: type["Editor"]) -> None:
    """Make ``editor`` available as ``--method name``."""
    if name in EDITORS:
        raise ValueError(f"an editor named {name!r} is already registered ({EDITORS[name].__name__})")
    EDITORS[name] = editor
