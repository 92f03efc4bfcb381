"""rlsedit: lifelong knowledge editing of LLMs with the exact recursive least-squares editor.

The public names are importable from here; each is loaded on first use, so ``import rlsedit``
(and the command's start) does not import torch or transformers::

    from rlsedit import RLSEdit, RLSEditConfig, Session, load_model
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

ONEDNN_PRIMITIVE_CACHE = "8192"
"""Capacity of oneDNN's primitive cache, set for the process unless the user set it.

oneDNN runs bfloat16 products on CPU with kernels generated and cached per matrix shape; the
value-target optimisation multiplies ~2,000 distinct shapes along a stream (rows × replayed
width changes as requests stop and groups shrink, times a dozen weight shapes, forward and
backward). With oneDNN's default capacity (1,024) they evict each other and every product
regenerates its kernel, several times slower per product (benchmarks/SPEED.md). oneDNN reads
the variable when it first builds its cache, so it is set at import, before any product runs.
"""
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE)

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    **{name: "rlsedit.editors" for name in (
        "RLSEdit", "RLSEditConfig", "RLSEditOfficial", "RLSEditOfficialConfig", "MEMIT", "MEMITConfig",
        "MEMITSeq", "MEMITSeqConfig", "AlphaEdit", "AlphaEditConfig", "ROME", "ROMEConfig", "FT", "FTConfig",
        "EditConfig", "Editor", "EditRecord", "get_editor_class", "register_editor")},
    **{name: "rlsedit.requests" for name in ("EditRequest", "parse_request", "read_requests")},
    **{name: "rlsedit.session.session" for name in ("Session", "Runtime", "EditReport")},
    **{name: "rlsedit.model.load" for name in ("load_model", "LoadedModel")},
    **{name: "rlsedit.errors" for name in (
        "RLSEditError", "InvalidRequestError", "NumericalError", "ModelLoadError", "UnsupportedError",
        "StateError", "StateCorruptError", "StateMismatchError", "StateLockedError")},
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlsedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next look-up is a plain attribute read
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily
    from .editors import (FT, MEMIT, ROME, AlphaEdit, AlphaEditConfig, EditConfig, Editor, EditRecord, FTConfig,
                          MEMITConfig, MEMITSeq, MEMITSeqConfig, RLSEdit, RLSEditConfig, RLSEditOfficial,
                          RLSEditOfficialConfig, ROMEConfig, get_editor_class, register_editor)
    from .errors import (InvalidRequestError, ModelLoadError, NumericalError, RLSEditError, StateCorruptError,
                         StateError, StateLockedError, StateMismatchError, UnsupportedError)
    from .model.load import LoadedModel, load_model
    from .requests import EditRequest, parse_request, read_requests
    from .session.session import EditReport, Runtime, Session
