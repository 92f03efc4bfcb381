"""Atomic, durable file writes: content, formatting, failure behaviour and the fsync order."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from rlsedit.errors import StateError
from rlsedit.session import atomic
from rlsedit.session.atomic import (
    TEMP_PREFIX,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_named_by_hash,
    fsync_dir,
    list_temp_files,
    remove_temp_files,
)


def test_atomic_write_bytes_creates_and_replaces(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temp file left


def test_atomic_write_json_is_indented_sorted_and_newline_terminated(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"b": [1, 2], "a": {"y": 1.5, "x": None}})
    text = target.read_text()
    assert text == json.dumps({"a": {"x": None, "y": 1.5}, "b": [1, 2]}, indent=2, sort_keys=True) + "\n"
    assert text.index('"a"') < text.index('"b"')


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": float("inf")}, {"x": object()}])
def test_atomic_write_json_refuses_unrepresentable_values_and_writes_nothing(tmp_path, bad):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(StateError, match="JSON"):
        atomic_write_json(target, bad)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert list_temp_files(tmp_path) == []


def test_failed_rename_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StateError, match="f.bin.*No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert list_temp_files(tmp_path) == []


def test_durability_order_is_fsync_file_then_rename_then_fsync_dir(tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        calls.append(("fsync", kind))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.path.basename(dst)))
        assert os.path.basename(src).startswith(TEMP_PREFIX)
        assert os.path.dirname(src) == os.path.dirname(dst)  # same directory: rename is atomic
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert calls == [("fsync", "file"), ("replace", "f.bin"), ("fsync", "dir")]


def test_a_file_named_by_its_hash_is_hashed_while_written(tmp_path):
    chunks = [b"header", memoryview(b"-tensor-bytes"), b""]
    path, sha = atomic_write_named_by_hash(tmp_path, lambda digest: f"snap-{digest[:12]}.bin", iter(chunks))
    assert sha == hashlib.sha256(b"header-tensor-bytes").hexdigest()
    assert path == tmp_path / f"snap-{sha[:12]}.bin"
    assert path.read_bytes() == b"header-tensor-bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


def test_a_write_named_by_hash_that_fails_leaves_nothing(tmp_path):
    def chunks():
        yield b"partial"
        raise OSError(28, "No space left on device")

    with pytest.raises(StateError, match="No space left"):
        atomic_write_named_by_hash(tmp_path, lambda digest: "never.bin", chunks())
    assert list(tmp_path.iterdir()) == []


def test_fsync_dir_requires_a_directory(tmp_path):
    fsync_dir(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "file")


def test_remove_temp_files_removes_only_temp_files(tmp_path, caplog):
    (tmp_path / f"{TEMP_PREFIX}manifest.json-abc").write_bytes(b"half")
    (tmp_path / "manifest.json").write_bytes(b"{}")
    removed = remove_temp_files(tmp_path)
    assert [p.name for p in removed] == [f"{TEMP_PREFIX}manifest.json-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert "temporary file" in caplog.text
    assert remove_temp_files(tmp_path / "missing") == []
    assert atomic.list_temp_files(tmp_path) == []
