"""tensorfile: our safetensors writer is read back by the safetensors library itself, and a
snapshot is hashed and written from the tensors' memory without assembling the file.

The one-pass verified reader (read_verified) reads our files and the library's bit-exactly,
refuses every damaged or hostile file with StateCorruptError, and reads a snapshot without
holding its bytes next to the tensors.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from rlsedit.errors import StateCorruptError, StateError
from rlsedit.session import tensorfile
from rlsedit.session.store import StateStore
from rlsedit.session.tensorfile import encode, encode_parts


def mixed_tensors() -> dict[str, torch.Tensor]:
    base = torch.randn(4, 6)
    return {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(2, dtype=torch.float64),
        "f16": torch.randn(3).half(),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.arange(6).reshape(2, 3),
        "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.arange(7, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "row_view": base[1],          # a view with a storage offset
        "transposed": base.t(),       # non-contiguous: copied
    }


def test_the_safetensors_library_reads_our_files_bit_exactly(tmp_path):
    tensors = mixed_tensors()
    data = encode(tensors, {"format": "x", "note": "ünïcode"})
    got = safetensors.torch.load(data)
    assert sorted(got) == sorted(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "x", "note": "ünïcode"}
        assert torch.equal(handle.get_tensor("row_view"), tensors["row_view"])


def test_every_tensor_starts_aligned_and_the_parts_add_up():
    encoded = encode_parts(mixed_tensors(), {})
    data = encoded.tobytes()
    assert len(encoded.header) % 8 == 0 and encoded.size == len(data)
    offset = len(encoded.header)
    for tensor in encoded.tensors:
        assert offset % tensor.element_size() == 0
        offset += tensor.numel() * tensor.element_size()
    assert offset == len(data)


def test_unsupported_dtypes_are_refused_by_name():
    with pytest.raises(StateError, match="'z'.*complex64"):
        encode({"z": torch.zeros(2, dtype=torch.complex64)}, {})


def test_a_snapshot_is_never_assembled_in_memory(tmp_path, monkeypatch):
    def assembled(self):
        raise AssertionError("the snapshot was joined into one buffer")

    monkeypatch.setattr(tensorfile.Encoded, "tobytes", assembled)
    big = {"C": torch.randn(256, 256, dtype=torch.float64), "W": torch.randn(256, 64)}
    with StateStore.create(tmp_path / "s", {"model": "tiny"}) as store:
        store.write_snapshot(big, {"n": 1}, covers_seq=0)
        got, meta, _ = store.read_snapshot()
    assert torch.equal(got["C"], big["C"]) and torch.equal(got["W"], big["W"]) and meta == {"n": 1}


# ---------------------------------------------------------------------- read_verified
def write_file(directory: Path, data: bytes, name: str = "f.safetensors") -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def read_back(path: Path, data: bytes, *, size: int | None = -1):
    """read_verified with the sha256 of ``data`` (the file as it was meant to be)."""
    return tensorfile.read_verified(
        path, sha256=hashlib.sha256(data).hexdigest(), size=len(data) if size == -1 else size,
        what="snapshot",
    )


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(tensor)), name


def assert_ordinary_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Writable, contiguous, each owning exactly its own memory."""
    pointers = set()
    for name, tensor in tensors.items():
        assert tensor.is_contiguous() and tensor.device.type == "cpu", name
        storage = tensor.untyped_storage()
        assert storage.nbytes() == tensor.numel() * tensor.element_size(), name
        if storage.nbytes():
            pointers.add(storage.data_ptr())
        if not tensor.numel():
            continue
        others = {other: t.clone() for other, t in tensors.items() if other != name}
        was = tensor.clone()
        tensor.reshape(-1).view(torch.uint8)[0] ^= 1  # writable, in place
        assert not torch.equal(as_bytes(tensor), as_bytes(was)), name
        assert all(torch.equal(t, tensors[other]) for other, t in others.items()), name
    assert len(pointers) == sum(1 for t in tensors.values() if t.numel())


def more_tensors() -> dict[str, torch.Tensor]:
    return {
        **mixed_tensors(),
        "i16": torch.arange(-4, 5, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8).reshape(2, 3),
        "empty_middle": torch.zeros(2, 0, 3, dtype=torch.float16),
        "empty_bool": torch.zeros(0, dtype=torch.bool),
        "scalar_i64": torch.tensor(-7),
        "ones": torch.ones(1, 1, 1, dtype=torch.bfloat16),
        "strided": torch.arange(40, dtype=torch.float64).reshape(5, 8)[::2, 1::3],
        "long": torch.randn(3001),  # spans several read chunks when they are small
    }


@pytest.mark.parametrize("chunk", [None, 7])
def test_read_verified_reads_our_files_bit_exactly(tmp_path, monkeypatch, chunk):
    if chunk is not None:  # odd, tiny chunks: every tensor is filled and hashed piece by piece
        monkeypatch.setattr(tensorfile, "_READ_CHUNK_BYTES", chunk)
    tensors = more_tensors()
    metadata = {"format": "x", "note": "ünïcode"}
    data = encode_parts(tensors, metadata).tobytes()
    got, got_metadata = read_back(write_file(tmp_path, data), data)
    assert got_metadata == metadata
    assert_bit_exact(got, tensors)
    assert_ordinary_tensors(got)
    assert tensorfile.file_sha256(tmp_path / "f.safetensors", what="snapshot") == (
        hashlib.sha256(data).hexdigest(), len(data))


def test_read_verified_reads_what_the_store_wrote(tmp_path):
    tensors = more_tensors()
    with StateStore.create(tmp_path / "s", {"model": "tiny"}) as store:
        store.write_snapshot(tensors, {"n": 1}, covers_seq=0)
    with StateStore.open(tmp_path / "s") as store:
        got, meta, covers = store.read_snapshot()
    assert (meta, covers) == ({"n": 1}, 0)
    assert_bit_exact(got, tensors)
    assert_ordinary_tensors(got)
    (path,) = (tmp_path / "s").glob("snapshot-*.safetensors")
    direct, metadata = read_back(path, path.read_bytes())
    assert_bit_exact(direct, tensors) and metadata["format"] == "rlsedit.snapshot/1"


@pytest.mark.parametrize("metadata", [None, {"written by": "safetensors"}])
def test_read_verified_reads_files_of_the_safetensors_library(tmp_path, metadata):
    tensors = {name: t.contiguous() for name, t in more_tensors().items()}
    data = safetensors.torch.save(tensors, metadata=metadata)
    got, got_metadata = read_back(write_file(tmp_path, data), data)
    assert got_metadata == (metadata or {})
    assert_bit_exact(got, tensors)
    assert_ordinary_tensors(got)


def test_a_wrong_sha256_gives_the_same_message_as_check_sha256(tmp_path):
    data = encode({"W": torch.ones(3)}, {})
    path = write_file(tmp_path, data)
    wrong = "0" * 64
    with pytest.raises(StateCorruptError) as streamed:
        tensorfile.read_verified(path, sha256=wrong, size=None, what="snapshot")
    with pytest.raises(StateCorruptError) as whole:
        tensorfile.check_sha256(data, wrong, path, what="snapshot")
    assert str(streamed.value) == str(whole.value) and "fails its checksum" in str(whole.value)


def test_every_flipped_byte_is_refused(tmp_path):
    encoded = encode_parts(more_tensors(), {"format": "x"})
    data = encoded.tobytes()
    path = tmp_path / "f.safetensors"
    # every byte of the header (length, JSON, padding); the first and last of each tensor, and a sample
    positions = set(range(len(encoded.header))) | set(range(len(encoded.header), len(data), 97))
    offset = len(encoded.header)
    for tensor in encoded.tensors:
        size = tensor.numel() * tensor.element_size()
        positions |= {offset, offset + size - 1} if size else set()
        offset += size
    for position in sorted(positions):
        for mask in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[position] ^= mask
            path.write_bytes(damaged)
            for size in (len(data), None):  # with and without the size known beforehand
                with pytest.raises(StateCorruptError, match="f.safetensors"):
                    read_back(path, data, size=size)


def test_truncation_anywhere_is_refused(tmp_path):
    data = encode_parts(more_tensors(), {"format": "x"}).tobytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path = tmp_path / "f.safetensors"
    for cut in sorted({0, 1, 7, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1,
                       (header_end + len(data)) // 2, len(data) - 1}):
        path.write_bytes(data[:cut])
        with pytest.raises(StateCorruptError, match="has .* bytes, .* were written"):
            read_back(path, data)
        with pytest.raises(StateCorruptError, match="f.safetensors"):
            read_back(path, data, size=None)


def test_a_missing_file_is_refused_by_name(tmp_path):
    with pytest.raises(StateCorruptError, match="missing"):
        read_back(tmp_path / "gone.safetensors", b"")
    with pytest.raises(StateCorruptError, match="missing"):
        tensorfile.file_sha256(tmp_path / "gone.safetensors", what="snapshot")


def craft(
    header: object = None, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None
) -> bytes:
    """A file with any header at all (JSON of ``header``, or ``raw`` bytes) and any length field."""
    text = json.dumps(header).encode() if raw is None else raw
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def f32(begin: int, end: int, shape: list) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


EIGHT = bytes(range(8))
TWO_F32 = {"a": f32(0, 8, [2])}  # with EIGHT: a valid file
HOSTILE = {
    "overlap": craft({"a": f32(0, 8, [2]), "b": f32(4, 12, [2])}, bytes(12)),
    "gap": craft({"a": f32(0, 8, [2]), "b": f32(12, 20, [2])}, bytes(20)),
    "gap at the start": craft({"a": f32(4, 12, [2])}, bytes(12)),
    "data past the last tensor": craft({"a": f32(0, 8, [2])}, bytes(16)),
    "offsets past the end": craft({"a": f32(0, 16, [4])}, EIGHT),
    "offsets reversed": craft({"a": f32(8, 0, [2])}, EIGHT),
    "negative offset": craft({"a": f32(-8, 0, [2])}, EIGHT),
    "float offsets": craft({"a": f32(0.0, 8.0, [2])}, EIGHT),
    "three offsets": craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, EIGHT),
    "string offsets": craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, EIGHT),
    "unknown dtype": craft({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, EIGHT),
    "dtype not a string": craft({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, EIGHT),
    "negative shape": craft({"a": f32(0, 8, [-2])}, EIGHT),
    "negative pair": craft({"a": f32(0, 8, [-1, -2])}, EIGHT),
    "float shape": craft({"a": f32(0, 8, [2.0])}, EIGHT),
    "bool shape": craft({"a": f32(0, 4, [True])}, EIGHT[:4]),
    "shape not a list": craft({"a": f32(0, 8, 2)}, EIGHT),
    "shape and offsets disagree": craft({"a": f32(0, 8, [3])}, EIGHT),
    "empty shape that overflows": craft({"a": f32(0, 0, [0, 2**62, 2**62])}),
    "a size beyond int64": craft({"a": f32(0, 0, [0, 2**70])}),
    "missing field": craft({"a": {"dtype": "F32", "shape": [2]}}, EIGHT),
    "extra field": craft({"a": {**f32(0, 8, [2]), "extra": 1}}, EIGHT),
    "tensor not an object": craft({"a": [0, 8]}, EIGHT),
    "header a list": craft([1, 2], EIGHT),
    "header a string": craft("x", EIGHT),
    "header null": craft(None),
    "metadata not a map": craft({"__metadata__": ["x"]}),
    "metadata values not strings": craft({"__metadata__": {"n": 1}}),
    "repeated tensor": craft(raw=b'{"a":%s,"a":%s}' % ((json.dumps(f32(0, 0, [0])).encode(),) * 2)),
    "not JSON": craft(raw=b"{nope"),
    "not UTF-8": craft(raw=b'{"\xff\xfe":1}'),
    "deeply nested": craft(raw=b"[" * 100_000 + b"]" * 100_000),
    "huge integer": craft(raw=b'{"a":' + b"9" * 5000 + b"}"),
    "header length past the file": craft({}, EIGHT, length=10**6),
    "header length 2**64-1": craft({}, length=2**64 - 1),
    "header length into the data": craft(TWO_F32, EIGHT, length=len(json.dumps(TWO_F32)) + 4),
    "header length short of the JSON": craft(TWO_F32, EIGHT, length=len(json.dumps(TWO_F32)) - 1),
    "no header length": b"\x01\x02",
    "bool tensor that is not 0 or 1": craft({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}},
                                            b"\x01\x02"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_file_with_a_valid_sha256_is_refused(tmp_path, case):
    data = HOSTILE[case]
    path = write_file(tmp_path, data)
    with pytest.raises(StateCorruptError, match="f.safetensors") as refused:
        read_back(path, data)  # size and sha256 match: only the header checks can refuse it
    assert "checksum" not in str(refused.value)
    with pytest.raises(StateCorruptError, match="f.safetensors"):
        read_back(path, data, size=None)


def test_crafted_files_that_are_valid_are_read(tmp_path):
    """The crafting helper makes files the reader accepts: the refusals above are the header's."""
    for data, want in [
        (craft(TWO_F32, bytes(8)), {"a": torch.zeros(2)}),
        (craft({"a": f32(0, 8, [2]), "b": f32(8, 12, [1])}, bytes(12)),
         {"a": torch.zeros(2), "b": torch.zeros(1)}),
        (craft({"__metadata__": {"n": "1"}, "e": f32(0, 0, [0, 2**40])}), {"e": torch.zeros(0, 2**40)}),
        (craft({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x00"),
         {"b": torch.tensor([True, False])}),
        (craft({}), {}),
    ]:
        got, _ = read_back(write_file(tmp_path, data), data)
        assert_bit_exact(got, want)


# ---------------------------------------------------------------------- memory
def big_snapshot(directory: Path) -> int:
    """A state directory whose snapshot holds 4 tensors x 32 MiB; returns the file's size."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"T{i}": torch.randn(8 << 20, generator=gen) for i in range(4)}
    with StateStore.create(directory, {"model": "big"}) as store:
        store.write_snapshot(tensors, {"n": 4}, covers_seq=0)
    (path,) = directory.glob("snapshot-*.safetensors")
    return path.stat().st_size


def test_opening_and_reading_a_snapshot_never_holds_its_bytes(tmp_path, monkeypatch):
    size = big_snapshot(tmp_path / "s")
    read_paths: list[Path] = []
    real_read_bytes = Path.read_bytes

    def spy_read_bytes(self):
        read_paths.append(self)
        return real_read_bytes(self)

    def no_load(*args, **kwargs):
        raise AssertionError("safetensors.torch.load was called: it needs the file's bytes")

    monkeypatch.setattr(Path, "read_bytes", spy_read_bytes)
    monkeypatch.setattr(safetensors.torch, "load", no_load)
    tracemalloc.start()
    try:
        with StateStore.open(tmp_path / "s") as store:
            got, meta, _ = store.read_snapshot()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not [p for p in read_paths if p.name.startswith("snapshot-")], read_paths
    # Python-level allocations (a bytes copy of the file would be one); torch's are not traced
    assert peak < size // 8, (peak, size)
    assert meta == {"n": 4} and sorted(got) == ["T0", "T1", "T2", "T3"]
    assert sum(t.numel() * t.element_size() for t in got.values()) == 4 * (32 << 20)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc")
def test_reading_a_snapshot_costs_its_tensors_once(tmp_path):
    """Peak RSS of a fresh process: the tensors (128 MiB) plus little, not the file's bytes too."""
    size = big_snapshot(tmp_path / "s")
    child = textwrap.dedent(
        f"""
        import torch
        from rlsedit.session.store import StateStore

        def peak_rss():  # VmHWM: this process's own peak (ru_maxrss would start at the parent's)
            line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024

        torch.zeros(1) + 1  # settle torch's own start-up allocations
        before = peak_rss()
        with StateStore.open({str(tmp_path / "s")!r}) as store:
            tensors, _, _ = store.read_snapshot()
        print(peak_rss() - before, sum(t.numel() * t.element_size() for t in tensors.values()))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth, held = map(int, result.stdout.split())
    assert held == 4 * (32 << 20)
    assert growth < held + size // 4, (growth, held, size)  # the old reader: ~2x (file bytes + clone)
