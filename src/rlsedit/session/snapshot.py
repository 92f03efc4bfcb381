"""Snapshot files: the caller's full state at one point of the journal.

``snapshot-<covers_seq:08d>-<sha12>.safetensors`` holds the caller's tensors; its safetensors
metadata (``str -> str``) is::

    format     = "rlsedit.snapshot/1"
    covers_seq = "<n>"     the state after journal entries 0 .. n-1 (replay starts at n)
    meta       = caller's metadata as compact JSON (sorted keys)

The manifest records its name, size and sha256 (see :mod:`.manifest`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import StateCorruptError, StateError
from .jsonio import decimal_count, dumps_json, json_object, to_json_value
from .tensorfile import Encoded, decode, encode_parts

SNAPSHOT_FORMAT = "rlsedit.snapshot/1"
SNAPSHOT_WHAT = "snapshot"  # how errors name a snapshot file


def encode_snapshot(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], covers_seq: int) -> Encoded:
    """The snapshot file, unassembled (the store hashes it, then writes it piece by piece)."""
    if not isinstance(meta, Mapping):
        raise StateError(f"snapshot meta must be a dict, got {type(meta).__name__}")
    metadata = {
        "format": SNAPSHOT_FORMAT,
        "covers_seq": str(covers_seq),
        "meta": dumps_json(to_json_value(dict(meta), what="snapshot meta"), compact=True),
    }
    return encode_parts(tensors, metadata)


def decode_snapshot(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """``(tensors, meta, covers_seq)`` from the (already checksummed) bytes of ``path``.

    The store reads snapshots with :func:`~.tensorfile.read_verified` and :func:`check_snapshot`
    (no file-sized buffer); this bytes form serves tests that feed damaged bytes straight in.
    """
    tensors, metadata = decode(data, path, what=SNAPSHOT_WHAT)
    return check_snapshot(tensors, metadata, path)


def check_snapshot(
    tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """``(tensors, meta, covers_seq)`` from the decoded content of snapshot file ``path``."""

    def corrupt(problem: str) -> StateCorruptError:
        return StateCorruptError(f"{SNAPSHOT_WHAT} {path} is corrupt: {problem}")

    if set(metadata) != {"format", "covers_seq", "meta"} or metadata["format"] != SNAPSHOT_FORMAT:
        raise corrupt(f"metadata {sorted(metadata)} is not that of an {SNAPSHOT_FORMAT} file")
    covers_seq = decimal_count(metadata["covers_seq"])
    if covers_seq is None:
        raise corrupt(f"covers_seq {metadata['covers_seq']!r} is not a decimal integer")
    try:
        meta = json_object(metadata["meta"])
    except ValueError as exc:
        raise corrupt(f"meta {exc}") from None
    return tensors, meta, covers_seq
