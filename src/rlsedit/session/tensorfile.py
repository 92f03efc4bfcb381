"""Named tensors + string metadata <-> safetensors bytes, and the checksum of those bytes.

Every tensor file of a state directory goes through here. Tensors are saved dense,
contiguous and on the CPU (a private copy, so views and shared storage are fine); non-finite
floating values are refused, never written. Metadata is safetensors' ``__metadata__``: a
``str -> str`` map. Decoding happens only on bytes whose sha256 the caller has already
checked, but still turns any malformation into :class:`~rlsedit.errors.StateCorruptError`.
No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from ..errors import NumericalError, StateCorruptError, StateError

_HEADER_LENGTH_BYTES = 8  # safetensors: u64 little-endian header length, then JSON header
_RESERVED_NAME = "__metadata__"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file_bytes(path: Path, *, what: str) -> bytes:
    """The whole file; a missing or unreadable file is a corrupt state (named)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StateCorruptError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise StateCorruptError(f"{what} {path} cannot be read: {exc}") from exc


def check_sha256(data: bytes, expected: str, path: Path, *, what: str) -> None:
    found = sha256_hex(data)
    if found != expected:
        raise StateCorruptError(
            f"{what} {path} fails its checksum (sha256 {found[:16]}..., expected "
            f"{expected[:16]}...): it was truncated, corrupted or modified after it was written"
        )


def prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate ``tensors`` and return private dense, contiguous CPU copies.

    Raises :class:`StateError` for a bad name or type, :class:`NumericalError` for
    NaN/Inf values (naming the tensor).
    """
    if not isinstance(tensors, Mapping):
        raise StateError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == _RESERVED_NAME:
            raise StateError(
                f"tensor names must be non-empty strings other than {_RESERVED_NAME!r}, got {name!r}"
            )
        if not isinstance(tensor, torch.Tensor):
            raise StateError(f"tensor {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.layout != torch.strided:
            raise StateError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors can be stored")
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise NumericalError(f"tensor {name!r} holds NaN or Inf values; refusing to store it")
        # a private copy: never aliases the caller's memory, never shares storage with another entry
        prepared[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return prepared


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` (validated by :func:`prepare_tensors`) and ``metadata``."""
    prepared = prepare_tensors(tensors)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise StateError("safetensors metadata must map str to str")
    try:
        return safetensors.torch.save(prepared, metadata=dict(metadata))
    except Exception as exc:  # safetensors raises its own error types (unsupported dtype, ...)
        raise StateError(f"cannot encode tensors {sorted(prepared)} as safetensors: {exc}") from exc


def decode_metadata(data: bytes, path: Path, *, what: str) -> dict[str, str]:
    """The ``__metadata__`` map of safetensors ``data`` (read from ``path``), header only."""
    if len(data) < _HEADER_LENGTH_BYTES:
        raise StateCorruptError(f"{what} {path} is too short to be a safetensors file ({len(data)} bytes)")
    header_length = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    if header_length > len(data) - _HEADER_LENGTH_BYTES:
        raise StateCorruptError(f"{what} {path} is truncated: its header claims {header_length} bytes")
    try:
        header = json.loads(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + header_length])
    except (ValueError, RecursionError) as exc:
        raise StateCorruptError(f"{what} {path} has an unreadable safetensors header: {exc}") from exc
    metadata = header.get(_RESERVED_NAME, {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise StateCorruptError(f"{what} {path} has a malformed safetensors header")
    return metadata


def decode(data: bytes, path: Path, *, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` from safetensors ``data``; tensors own their (writable) memory."""
    metadata = decode_metadata(data, path, what=what)
    try:
        views = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types on malformed data
        raise StateCorruptError(f"{what} {path} is not a valid safetensors file: {exc}") from exc
    # load() wraps the immutable ``data`` buffer; clone so callers get ordinary tensors
    return {name: view.clone() for name, view in views.items()}, metadata


