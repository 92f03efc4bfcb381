"""Editors: each says how its method turns keys and targets into a weight update.

The registry maps a method name (``--method``) to its editor class; ``register_editor`` is
keyword-only and refuses a name twice.
"""

from __future__ import annotations

from .alphaedit import AlphaEdit
from .base import EditRecord, Editor, Proposal
from .config import (AlphaEditConfig, EditConfig, FTConfig, MEMITConfig, MEMITSeqConfig, RLSEditConfig,
                     RLSEditOfficialConfig, ROMEConfig)
from .ft import FT
from .memit import MEMIT, MEMITSeq
from .rlsedit import RLSEdit, RLSEditOfficial
from .registry import EDITORS, get_editor_class, register_editor
from .rome import ROME

for _cls in (RLSEdit, RLSEditOfficial, MEMIT, MEMITSeq, AlphaEdit, ROME, FT):
    register_editor(name=_cls.name, editor=_cls)


__all__ = [
    "AlphaEdit", "AlphaEditConfig", "EDITORS", "EditConfig", "EditRecord", "Editor", "FT", "FTConfig", "MEMIT",
    "MEMITConfig", "MEMITSeq", "MEMITSeqConfig", "Proposal", "RLSEdit", "RLSEditConfig", "RLSEditOfficial",
    "RLSEditOfficialConfig", "ROME", "ROMEConfig", "get_editor_class", "register_editor",
]
