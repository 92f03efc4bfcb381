"""Named tensors + string metadata <-> safetensors files, and the checksums of those files.

Every tensor file of a state directory goes through here. Tensors are saved dense and
little-endian; non-finite floating values are refused, never written. Metadata is
safetensors' ``__metadata__``: a ``str -> str`` map. No pickle anywhere. Any malformation met
while reading turns into :class:`~rlsedit.errors.StateCorruptError` naming the file.

Encoding writes the safetensors layout itself so that a file can be produced piece by piece
(:class:`Encoded`): an 8-byte little-endian header length, the JSON header (tensor name ->
dtype, shape, byte offsets; padded with spaces to a multiple of 8), then each tensor's bytes
in header order. Tensors are ordered by decreasing item size, then name, so every tensor
starts at a multiple of its item size. A snapshot (W_0, W, C, E[kkᵀ] of every edited layer:
~200 MiB on SmolLM2) is thus hashed and written straight from the tensors' memory: no
serialised copy of the whole state is ever held (a private copy plus the serialised bytes
used to add +293 MiB to the peak RSS of creating a SmolLM2 session).

Reading comes in two forms. Small files (journal entries) are read whole, their sha256
checked, and only then decoded (:func:`decode`). A snapshot is read in one pass by
:func:`read_verified`: each tensor is allocated once and filled straight from the file while
the sha256 is computed, so reading a snapshot costs ~1x the state, not the file's bytes plus
a decoded copy (2x: ~32 GB to open a Llama-3-8B-sized session). Since the hash is known only
at the end, the header is untrusted while it is used: it is validated in full (known dtypes,
sizes that match, byte ranges that tile the file exactly), which also bounds what it can
make us allocate by the file's size. :func:`file_sha256` hashes a file in chunks, for
checks that need no tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from ..errors import NumericalError, StateCorruptError, StateError
from ..files import file_sha256 as plain_file_sha256

_HEADER_LENGTH_BYTES = 8  # safetensors: u64 little-endian header length, then JSON header
_HEADER_ALIGNMENT = 8     # the header is padded so the data section starts 8-byte aligned
_RESERVED_NAME = "__metadata__"
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}
_READ_CHUNK_BYTES = 4 << 20  # hashing/filling step: the only memory a read needs beyond the tensors
_MAX_INT64 = 2**63 - 1       # torch sizes and strides are int64


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def _reading(path: Path, *, what: str) -> Iterator[None]:
    """Turn a missing or unreadable file into a corrupt state (named)."""
    try:
        yield
    except FileNotFoundError:
        raise StateCorruptError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise StateCorruptError(f"{what} {path} cannot be read: {exc}") from exc


def read_file_bytes(path: Path, *, what: str) -> bytes:
    """The whole file; a missing or unreadable file is a corrupt state (named)."""
    with _reading(path, what=what):
        return path.read_bytes()


def file_sha256(path: Path, *, what: str) -> tuple[str, int]:
    """``(sha256 hex digest, size in bytes)`` of ``path``, read a few MiB at a time."""
    with _reading(path, what=what):
        return plain_file_sha256(path)


def check_digest(found: str, expected: str, path: Path, *, what: str) -> None:
    """Raise :class:`StateCorruptError` unless sha256 ``found`` (of ``path``) is ``expected``."""
    if found != expected:
        raise StateCorruptError(
            f"{what} {path} fails its checksum (sha256 {found[:16]}..., expected "
            f"{expected[:16]}...): it was truncated, corrupted or modified after it was written"
        )


def check_sha256(data: bytes, expected: str, path: Path, *, what: str) -> None:
    check_digest(sha256_hex(data), expected, path, what=what)


def check_size(found: int, expected: int, path: Path, *, what: str) -> None:
    """Raise :class:`StateCorruptError` unless ``path`` has ``expected`` bytes."""
    if found != expected:
        raise StateCorruptError(
            f"{what} {path} has {found} bytes, {expected} were written (truncated or extended?)"
        )


def _require_little_endian(action: str) -> None:
    if sys.byteorder != "little":
        raise StateError(f"state files can only be {action} on a little-endian machine")


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

    def tobytes(self) -> bytes:
        return b"".join(self.chunks())


def encode_parts(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Encoded:
    """``tensors`` (validated by :func:`prepare_tensors`) and ``metadata`` as an :class:`Encoded`."""
    _require_little_endian("written")  # tensors are written from memory; safetensors is little-endian
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


@dataclass(frozen=True)
class _Slot:
    """One tensor of a validated header: where its bytes lie in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_verified(
    path: Path, *, sha256: str, size: int | None, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file ``path``, checked against ``sha256``.

    One pass: each tensor is allocated once and filled straight from the file while the file
    is hashed, so the peak memory is the tensors plus one chunk (no file-sized buffer, no
    clone). The tensors are ordinary, writable and own their memory. ``size`` (if given) is
    checked before anything is read. Every malformation, a wrong size or sha256 included,
    raises :class:`StateCorruptError` naming ``path``.
    """
    _require_little_endian("read")  # tensors are filled from the file's bytes as they lie
    digest = hashlib.sha256()
    with _reading(path, what=what), open(path, "rb", buffering=0) as file:
        file_size = os.fstat(file.fileno()).st_size
        if size is not None:
            check_size(file_size, size, path, what=what)
        if file_size < _HEADER_LENGTH_BYTES:
            raise StateCorruptError(f"{what} {path} is too short to be a safetensors file "
                                    f"({file_size} bytes)")
        prefix = _read_exact(file, _HEADER_LENGTH_BYTES, path, what=what)
        header_length = int.from_bytes(prefix, "little")
        data_size = file_size - _HEADER_LENGTH_BYTES - header_length
        if data_size < 0:  # bounds the header (and what it can make us allocate) by the file
            raise StateCorruptError(
                f"{what} {path} is truncated: its header claims {header_length} bytes of {file_size}"
            )
        header = _read_exact(file, header_length, path, what=what)
        digest.update(prefix)
        digest.update(header)
        slots, metadata = _parse_header(header, data_size, path, what=what)
        tensors: dict[str, torch.Tensor] = {}
        for slot in slots:
            tensor = torch.empty(slot.shape, dtype=slot.dtype)
            # the tensor's own memory as bytes; reshape(-1) of a fresh tensor is a view
            memory = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            for start in range(0, len(memory), _READ_CHUNK_BYTES):
                piece = memory[start : start + _READ_CHUNK_BYTES]
                _fill(file, piece, path, what=what)
                digest.update(piece)
            tensors[slot.name] = tensor
        if file.read(1):  # grown since fstat: what we hashed is not the whole file
            raise StateCorruptError(f"{what} {path} changed while it was read")
    check_digest(digest.hexdigest(), sha256, path, what=what)
    for name, tensor in tensors.items():  # torch assumes a bool is stored as 0 or 1
        if tensor.dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
            raise StateCorruptError(f"{what} {path} holds bool tensor {name!r} with bytes other than 0 and 1")
    return tensors, metadata


def _fill(file: BinaryIO, buffer: memoryview, path: Path, *, what: str) -> None:
    """Fill ``buffer`` from ``file``; running out of file means it was truncated."""
    done = 0
    while done < len(buffer):
        count = file.readinto(buffer[done:])
        if not count:
            raise StateCorruptError(f"{what} {path} is truncated: it ended early while it was read")
        done += count


def _read_exact(file: BinaryIO, count: int, path: Path, *, what: str) -> bytearray:
    buffer = bytearray(count)
    _fill(file, memoryview(buffer), path, what=what)
    return buffer


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key is repeated")
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _extent(shape: list[int]) -> int | None:
    """The product of ``max(size, 1)``: torch's largest stride (x the last size); None past int64.

    For a non-empty tensor it is its element count. An empty one's other sizes are bounded
    by no data, so this keeps torch.empty from overflowing on them; stopping early keeps a
    hostile shape from costing big-integer arithmetic.
    """
    total = 1
    for size in shape:
        total *= max(size, 1)
        if total > _MAX_INT64:
            return None
    return total


def _parse_header(
    header_bytes: bytearray, data_size: int, path: Path, *, what: str
) -> tuple[list[_Slot], dict[str, str]]:
    """Validate an untrusted safetensors header in full; its tensors in file order + metadata.

    The sha256 is known only after the data is read, so nothing here may trust the header:
    each tensor's byte range must match its dtype and shape, and the ranges must tile the
    data section (``data_size`` bytes) exactly, so nothing larger than the file is allocated.
    """

    def corrupt(problem: str) -> StateCorruptError:
        return StateCorruptError(f"{what} {path} has a malformed safetensors header: {problem}")

    try:
        header = json.loads(header_bytes, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise corrupt(f"unreadable JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt(f"not a JSON object ({type(header).__name__})")
    metadata = header.pop(_RESERVED_NAME, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(f"{_RESERVED_NAME} is not a map of str to str")
    slots = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != _TENSOR_FIELDS:
            raise corrupt(f"tensor {name!r} is not described by exactly {sorted(_TENSOR_FIELDS)}")
        dtype = _DTYPES_BY_NAME.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise corrupt(f"tensor {name!r} has an unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        well_formed = isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
        extent = _extent(shape) if well_formed else None
        if extent is None:
            raise corrupt(f"tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise corrupt(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] within the "
                          f"{data_size}-byte data section")
        begin, end = offsets
        nbytes = (0 if 0 in shape else extent) * dtype.itemsize
        if end - begin != nbytes:
            raise corrupt(f"tensor {name!r} of {info['dtype']} {shape} needs {nbytes} bytes, "
                          f"its data_offsets {offsets} hold {end - begin}")
        slots.append(_Slot(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end))
    slots.sort(key=lambda slot: (slot.begin, slot.end))
    position = 0
    for slot in slots:
        if slot.begin != position:
            kind = "a gap" if slot.begin > position else "an overlap"
            raise corrupt(f"{kind} before tensor {slot.name!r} at byte {slot.begin} of the data section")
        position = slot.end
    if position != data_size:
        raise corrupt(f"its tensors cover {position} bytes of a {data_size}-byte data section")
    return slots, metadata
