"""tensorfile: our safetensors writer is read back by the safetensors library itself, and a
snapshot is hashed and written from the tensors' memory without assembling the file."""

from __future__ import annotations

import hashlib

import pytest
import safetensors
import safetensors.torch
import torch

from rlsedit.errors import StateError
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
    assert encoded.sha256() == hashlib.sha256(data).hexdigest()
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
