"""Editors: each says how its method turns keys and targets into a weight update.

The registry maps a method name (``--method``) to its editor class; ``register_editor`` is
keyword-only and refuses a name twice.
"""

from __future__ import annotations

from ..errors import InvalidRequestError
from .alphaedit import AlphaEdit
from .base import EditRecord, Editor, Proposal
from .config import (AlphaEditConfig, EditConfig, FTConfig, MEMITConfig, MEMITSeqConfig, RLSEditConfig,
                     RLSEditOfficialConfig, ROMEConfig)
from .ft import FT
from .memit import MEMIT, MEMITSeq
from .rlsedit import RLSEdit, RLSEditOfficial
from .rome import ROME

EDITORS: dict[str, type[Editor]] = {}


def register_editor(*, name: str, editor: type[Editor]) -> None:
    """Make ``editor`` available as ``--method name``."""
    if name in EDITORS:
        raise ValueError(f"an editor named {name!r} is already registered ({EDITORS[name].__name__})")
    EDITORS[name] = editor


for _cls in (RLSEdit, RLSEditOfficial, MEMIT, MEMITSeq, AlphaEdit, ROME, FT):
    register_editor(name=_cls.name, editor=_cls)


def get_editor_class(name: str) -> type[Editor]:
    """The editor class registered as ``name`` (``--method``); an unknown name raises
    :class:`~rlsedit.errors.InvalidRequestError` listing the known ones."""
    try:
        return EDITORS[name]
    except KeyError:
        raise InvalidRequestError(f"unknown method {name!r}; choose one of: {', '.join(EDITORS)}") from None


__all__ = [
    "AlphaEdit", "AlphaEditConfig", "EDITORS", "EditConfig", "EditRecord", "Editor", "FT", "FTConfig", "MEMIT",
    "MEMITConfig", "MEMITSeq", "MEMITSeqConfig", "Proposal", "RLSEdit", "RLSEditConfig", "RLSEditOfficial",
    "RLSEditOfficialConfig", "ROME", "ROMEConfig", "get_editor_class", "register_editor",
]
