"""Journal entries: one safetensors file per acknowledged step, linked into a hash chain.

Entry ``seq`` lives at ``journal/<seq:08d>.safetensors``. Its tensors are the caller's; its
safetensors metadata (``str -> str``) is::

    format      = "rlsedit.journal-entry/1"
    seq         = "<seq>"                      (decimal)
    kind        = "<kind>"                     (caller's label, e.g. "edit", "undo")
    prev_sha256 = sha256 of entry seq-1's file ("" for entry 0)
    meta        = caller's metadata as compact JSON (sorted keys)

So ``sha256(entry n-1)`` is stored in entry ``n`` and ``sha256(entry count-1)`` in the
manifest: checking the chain from the head back verifies every byte of every entry, and a
missing, reordered or substituted entry breaks it, with O(1) journal data in the manifest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import StateCorruptError, StateError
from .jsonio import decimal_count, dumps_json, json_object, to_json_value
from .tensorfile import decode, decode_metadata, encode

JOURNAL_DIR_NAME = "journal"
ENTRY_FORMAT = "rlsedit.journal-entry/1"
_ENTRY_NAME_RE = re.compile(r"^(\d{8,})\.safetensors$")
_KIND_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class JournalEntry:
    """One acknowledged journal step, as read back (tensors are fresh CPU tensors)."""

    seq: int
    kind: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class EntryHeader:
    """The metadata of an entry file, validated: what chain verification needs."""

    seq: int
    kind: str
    meta: dict[str, Any]
    prev_sha256: str  # "" for entry 0


def entry_file_name(seq: int) -> str:
    return f"{seq:08d}.safetensors"


def parse_entry_file_name(name: str) -> int | None:
    """The seq an entry file name stands for, or None if ``name`` is not one (canonical only)."""
    match = _ENTRY_NAME_RE.match(name)
    if match is None:
        return None
    seq = int(match.group(1))
    return seq if entry_file_name(seq) == name else None


def check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise StateError(f"journal kind must be 1-64 characters of [A-Za-z0-9_.:-], got {kind!r}")
    return kind


def encode_entry(
    seq: int, kind: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], prev_sha256: str
) -> bytes:
    """The bytes of entry ``seq`` (see the module docstring for the layout)."""
    if not isinstance(meta, Mapping):
        raise StateError(f"journal entry meta must be a dict, got {type(meta).__name__}")
    metadata = {
        "format": ENTRY_FORMAT,
        "seq": str(seq),
        "kind": check_kind(kind),
        "prev_sha256": prev_sha256,
        "meta": dumps_json(to_json_value(dict(meta), what="journal entry meta"), compact=True),
    }
    return encode(tensors, metadata)


def read_entry_header(data: bytes, path: Path) -> EntryHeader:
    """Parse and validate the metadata of entry file ``path`` (bytes ``data``)."""
    what = "journal entry"
    metadata = decode_metadata(data, path, what=what)

    def corrupt(problem: str) -> StateCorruptError:
        return StateCorruptError(f"{what} {path} is corrupt: {problem}")

    if set(metadata) != {"format", "seq", "kind", "prev_sha256", "meta"}:
        raise corrupt(f"metadata fields {sorted(metadata)}")
    if metadata["format"] != ENTRY_FORMAT:
        raise corrupt(f"format {metadata['format']!r}, expected {ENTRY_FORMAT!r}")
    seq = decimal_count(metadata["seq"])
    if seq is None:
        raise corrupt(f"seq {metadata['seq']!r} is not a decimal integer")
    kind, prev = metadata["kind"], metadata["prev_sha256"]
    if not _KIND_RE.match(kind):
        raise corrupt(f"kind {kind!r}")
    if prev != "" and not _SHA256_RE.match(prev):
        raise corrupt(f"prev_sha256 {prev!r}")
    try:
        meta = json_object(metadata["meta"])
    except ValueError as exc:
        raise corrupt(f"meta {exc}") from None
    return EntryHeader(seq=seq, kind=kind, meta=meta, prev_sha256=prev)


def decode_entry(data: bytes, path: Path) -> tuple[JournalEntry, str]:
    """``(entry, prev_sha256)`` from the bytes of entry file ``path``."""
    header = read_entry_header(data, path)
    tensors, _ = decode(data, path, what="journal entry")
    entry = JournalEntry(seq=header.seq, kind=header.kind, meta=header.meta, tensors=tensors)
    return entry, header.prev_sha256
