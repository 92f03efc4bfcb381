"""Fuzz the loader: random byte damage to a valid state directory.

Decision: after a mutation, opening and reading everything must either give exactly the
original content, or raise a StateError subclass. Any other exception is a loader bug. The
first outcome is legitimate only where the bytes carry no content: the lock file, or JSON
whitespace in the manifest (its checksum covers values, not formatting); any change to a
safetensors file or to a manifest value must be refused.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rlsedit.errors import StateCorruptError, StateError
from rlsedit.session.journal import decode_entry
from rlsedit.session.manifest import parse_manifest
from rlsedit.session.snapshot import decode_snapshot
from rlsedit.session.store import StateStore


def build_state(directory: Path) -> None:
    with StateStore.create(directory, {"model": "tiny", "layers": [0, 1], "lam": 0.5}) as store:
        for seq in range(3):
            gen = torch.Generator().manual_seed(seq)
            tensors = {"K": torch.randn(3, 2, generator=gen), "n": torch.tensor([seq])}
            store.append("edit", {"seq": seq}, tensors)
        store.write_snapshot({"W": torch.arange(6.0).reshape(2, 3)}, {"v": 1}, covers_seq=2)


def read_everything(directory: Path):
    """Open and read all content; comparable with ==."""
    with StateStore.open(directory) as store:
        tensors, snapshot_meta, covers = store.read_snapshot()
        entries = [
            (e.seq, e.kind, e.meta, {k: (v.dtype, v.tolist()) for k, v in sorted(e.tensors.items())})
            for e in store.entries()
        ]
        snapshot = {k: (v.dtype, v.tolist()) for k, v in sorted(tensors.items())}
        return store.meta, store.journal_count, snapshot, snapshot_meta, covers, entries


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "state"
    build_state(directory)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    return directory, files, read_everything(directory)


def mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "append"]))
    event(f"mutation: {kind}")
    size = len(data)
    if kind == "flip" and size:
        pos = draw(st.integers(0, size - 1))
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    if kind == "set" and size:
        pos = draw(st.integers(0, size - 1))
        return data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
    if kind == "truncate":
        return data[: draw(st.integers(0, max(size - 1, 0)))]
    if kind == "insert":
        pos = draw(st.integers(0, size))
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    if kind == "delete" and size:
        pos = draw(st.integers(0, size - 1))
        return data[:pos] + data[pos + draw(st.integers(1, 8)) :]
    return data + draw(st.binary(min_size=1, max_size=16))


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples in every run (CI)
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_damage_is_refused_or_harmless(pristine, data):
    source, files, original = pristine
    name = data.draw(st.sampled_from(files), label="file")
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "state"
        shutil.copytree(source, directory)
        target = directory / name
        before = target.read_bytes()
        after = mutate(before, data.draw)
        target.write_bytes(after)
        try:
            content = read_everything(directory)
        except StateError as exc:
            event(f"refused: {type(exc).__name__}")
            if after != before and name != ".lock":
                assert isinstance(exc, StateCorruptError) or "format_version" in str(exc), exc
            return
        event(f"opened with identical content: {name}")
        assert content == original
        # only content-free bytes may change without a refusal
        assert name == ".lock" or after == before or (
            name == "manifest.json" and after.split() == before.split()
        ), (name, before, after)


PARSERS = {"journal": decode_entry, "snapshot": decode_snapshot, "manifest.json": parse_manifest}


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_parsers_behind_the_checksums_never_raise_anything_else(pristine, data):
    """Defence in depth: feed damaged bytes straight to the decoders, skipping the sha256 check."""
    source, files, _ = pristine
    name = data.draw(st.sampled_from([f for f in files if f != ".lock"]), label="file")
    parser = next(parse for prefix, parse in PARSERS.items() if name.startswith(prefix))
    damaged = mutate((source / name).read_bytes(), data.draw)
    try:
        parser(damaged, source / name)
        event("parsed")
    except StateError as exc:
        event(f"refused: {type(exc).__name__}")
