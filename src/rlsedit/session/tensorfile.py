"""Named tensors + string metadata <-> safetensors bytes, and the checksum of those bytes.

Every tensor file of a state directory goes through here. Tensors are saved dense and
little-endian; non-finite floating values are refused, never written. Metadata is
safetensors' ``__metadata__``: a ``str -> str`` map. Decoding happens only on bytes whose
sha256 the caller has already checked, but still turns any malformation into
:class:`~rlsedit.errors.StateCorruptError`. No pickle anywhere.

Encoding writes the safetensors layout itself so that a file can be produced piece by piece
(:class:`Encoded`): an 8-byte little-endian header length, the JSON header (tensor name ->
dtype, shape, byte offsets; padded with spaces to a multiple of 8), then each tensor's bytes
in header order. Tensors are ordered by decreasing item size, then name, so every tensor
starts at a multiple of its item size. A snapshot (W_0, W, C, E[kkᵀ] of every edited layer:
~200 MiB on SmolLM2) is thus hashed and written straight from the tensors' memory: no
serialised copy of the whole state is ever held (a private copy plus the serialised bytes
used to add +293 MiB to the peak RSS of creating a SmolLM2 session).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from ..errors import NumericalError, StateCorruptError, StateError

_HEADER_LENGTH_BYTES = 8  # safetensors: u64 little-endian header length, then JSON header
_HEADER_ALIGNMENT = 8     # the header is padded so the data section starts 8-byte aligned
_RESERVED_NAME = "__metadata__"
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


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
    """Validate ``tensors`` and return them dense, contiguous and on the CPU.

    A tensor that already is so is returned as a detached view (no copy: the caller must not
    change it until it is written); others are copied one by one. Raises
    :class:`StateError` for a bad name, type or dtype, :class:`NumericalError` for NaN/Inf
    values (naming the tensor).
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
        if tensor.dtype not in _DTYPE_NAMES:
            raise StateError(f"tensor {name!r} has dtype {tensor.dtype}, which cannot be stored "
                             f"(supported: {', '.join(str(d) for d in _DTYPE_NAMES)})")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NumericalError(f"tensor {name!r} holds NaN or Inf values; refusing to store it")
        prepared[name] = tensor.detach().to("cpu").contiguous()
    return prepared


@dataclass(frozen=True)
class Encoded:
    """A safetensors file not yet laid out in memory: its header and tensors, in file order."""

    header: bytes
    tensors: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.numel() * t.element_size() for t in self.tensors)

    def chunks(self) -> Iterator[memoryview]:
        """The file's bytes, piece by piece (header, then each tensor's memory)."""
        yield memoryview(self.header)
        for tensor in self.tensors:
            yield memoryview(tensor.reshape(-1).view(torch.uint8).numpy())

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def tobytes(self) -> bytes:
        return b"".join(self.chunks())


def encode_parts(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Encoded:
    """``tensors`` (validated by :func:`prepare_tensors`) and ``metadata`` as an :class:`Encoded`."""
    if sys.byteorder != "little":  # tensors are written from memory; safetensors is little-endian
        raise StateError("state files can only be written on a little-endian machine")
    prepared = prepare_tensors(tensors)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise StateError("safetensors metadata must map str to str")
    order = sorted(prepared, key=lambda name: (-prepared[name].element_size(), name))
    header: dict[str, object] = {_RESERVED_NAME: dict(metadata)}
    offset = 0
    for name in order:
        tensor = prepared[name]
        end = offset + tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + _HEADER_LENGTH_BYTES) % _HEADER_ALIGNMENT)
    return Encoded(header=len(text).to_bytes(_HEADER_LENGTH_BYTES, "little") + text,
                   tensors=tuple(prepared[name] for name in order))


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` (validated by :func:`prepare_tensors`) and ``metadata``."""
    return encode_parts(tensors, metadata).tobytes()


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


