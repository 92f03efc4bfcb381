"""Damaged state files: open refuses with StateCorruptError naming the file, changing nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rlsedit.errors import StateCorruptError
from rlsedit.session.atomic import TEMP_PREFIX
from rlsedit.session.journal import entry_file_name
from rlsedit.session.store import StateStore

N_ENTRIES = 6


def build_state(directory: Path) -> None:
    with StateStore.create(directory, {"model": "tiny", "layers": [1, 2]}) as store:
        store.write_snapshot({"W": torch.zeros(8, 4)}, {"v": 0}, 0)
        for seq in range(N_ENTRIES):
            gen = torch.Generator().manual_seed(seq)
            store.append("edit", {"seq": seq}, {"K": torch.randn(4, 3, generator=gen)})
        store.write_snapshot({"W": torch.ones(8, 4)}, {"v": 1}, 3)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pristine") / "state"
    build_state(directory)
    return directory


def snapshot_path(directory: Path) -> Path:
    (path,) = directory.glob("snapshot-*.safetensors")
    return path


def entry_path(directory: Path, seq: int) -> Path:
    return directory / "journal" / entry_file_name(seq)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # tensor data for safetensors: only a checksum can see it
    path.write_bytes(bytes(data))


def edit_manifest_meta(path: Path) -> None:
    obj = json.loads(path.read_text())
    obj["meta"]["layers"] = [1, 3]  # still valid JSON with the right structure
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def edit_manifest_count(path: Path) -> None:
    obj = json.loads(path.read_text())
    obj["journal"]["count"] -= 1  # as if the last acknowledged entry had never been
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def delete(path: Path) -> None:
    path.unlink()


def swap_entries(path: Path) -> None:
    other = path.with_name(entry_file_name(int(path.name.split(".")[0]) + 1))
    a, b = path.read_bytes(), other.read_bytes()
    path.write_bytes(b)
    other.write_bytes(a)


def substitute_entry_from_another_state(path: Path) -> None:
    # a perfectly valid entry with the same seq, from a different history
    other = path.parents[2] / "other"
    with StateStore.create(other, {}) as store:
        for seq in range(N_ENTRIES):
            store.append("edit", {"seq": seq}, {"K": torch.zeros(4, 3)})
    shutil.copyfile(entry_path(other, int(path.name.split(".")[0])), path)


CASES: list[tuple[str, Callable[[Path], Path], Callable[[Path], None]]] = [
    ("manifest-truncated", lambda d: d / "manifest.json", truncate),
    ("manifest-flipped", lambda d: d / "manifest.json", flip_last_byte),
    ("manifest-meta-edited", lambda d: d / "manifest.json", edit_manifest_meta),
    ("manifest-count-edited", lambda d: d / "manifest.json", edit_manifest_count),
    ("snapshot-truncated", snapshot_path, truncate),
    ("snapshot-flipped", snapshot_path, flip_last_byte),
    ("snapshot-deleted", snapshot_path, delete),
    ("first-entry-flipped", lambda d: entry_path(d, 0), flip_last_byte),
    ("middle-entry-truncated", lambda d: entry_path(d, 2), truncate),
    ("middle-entry-flipped", lambda d: entry_path(d, 2), flip_last_byte),
    ("middle-entry-deleted", lambda d: entry_path(d, 2), delete),
    ("middle-entries-swapped", lambda d: entry_path(d, 2), swap_entries),
    ("middle-entry-substituted", lambda d: entry_path(d, 3), substitute_entry_from_another_state),
    ("head-entry-flipped", lambda d: entry_path(d, N_ENTRIES - 1), flip_last_byte),
    ("head-entry-deleted", lambda d: entry_path(d, N_ENTRIES - 1), delete),
]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def open_reading_snapshot(directory: Path) -> StateStore:
    return StateStore.open_reading_snapshot(directory)[0]


@pytest.mark.parametrize("open_store", [StateStore.open, open_reading_snapshot], ids=["open", "open-reading"])
@pytest.mark.parametrize("where, damage", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_file_is_refused_naming_it_and_nothing_changes(pristine, tmp_path, where, damage, open_store):
    directory = tmp_path / "state"
    shutil.copytree(pristine, directory)
    target = where(directory)
    damage(target)
    # a crash leftover that a successful open would delete: a refused one must leave it
    (directory / f"{TEMP_PREFIX}manifest.json-1234").write_bytes(b"{")
    before = tree_bytes(directory)
    with pytest.raises(StateCorruptError) as info:
        open_store(directory)
    message = str(info.value)
    # the message names the damaged file; a swap is caught at whichever of the two comes first
    named = [target.name] if damage is not swap_entries else [target.name, entry_file_name(3)]
    assert any(name in message for name in named), message
    assert tree_bytes(directory) == before  # a refused open deletes and rewrites nothing
    # and the directory is not left locked
    shutil.rmtree(directory)
    shutil.copytree(pristine, directory)
    StateStore.open(directory).close()


def test_damage_after_open_is_caught_by_the_read_that_meets_it(pristine, tmp_path):
    directory = tmp_path / "state"
    shutil.copytree(pristine, directory)
    with StateStore.open(directory) as store:
        flip_last_byte(entry_path(directory, 4))
        reader = store.entries(start_seq=3)
        assert next(reader).seq == 3
        with pytest.raises(StateCorruptError, match=entry_file_name(4)):
            next(reader)
        flip_last_byte(snapshot_path(directory))
        with pytest.raises(StateCorruptError, match=snapshot_path(directory).name):
            store.read_snapshot()
        with pytest.raises(StateCorruptError):
            store.verify()


def test_pristine_state_opens_and_reads_whole(pristine, tmp_path):
    directory = tmp_path / "state"
    shutil.copytree(pristine, directory)
    with StateStore.open(directory) as store:
        store.verify()
        assert [e.meta["seq"] for e in store.entries()] == list(range(N_ENTRIES))
        tensors, meta, covers_seq = store.read_snapshot()
        assert (meta, covers_seq) == ({"v": 1}, 3)
    store, snapshot = StateStore.open_reading_snapshot(directory)
    with store:
        assert snapshot[1:] == (meta, covers_seq) and torch.equal(snapshot[0]["W"], tensors["W"])
    empty = tmp_path / "empty"
    StateStore.create(empty, {}).close()
    store, snapshot = StateStore.open_reading_snapshot(empty)
    store.close()
    assert snapshot is None
