"""StateStore: create/open, metadata, snapshots, journal, crash recovery, refusals."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from rlsedit.errors import NumericalError, StateCorruptError, StateError, StateLockedError, StateMismatchError
from rlsedit.session import store as store_module
from rlsedit.session.atomic import TEMP_PREFIX
from rlsedit.session.journal import entry_file_name, read_entry_header
from rlsedit.session.store import JournalEntry, StateStore, is_state_dir
from rlsedit.session.tensorfile import sha256_hex

META = {"model": {"spec": "tiny", "fingerprint": "ab12"}, "method": "rlsedit", "layers": [1, 2]}


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layers.1.K": torch.randn(4, 3, generator=gen),  # (d_k, u)
        "layers.1.V": torch.randn(3, 5, generator=gen, dtype=torch.float64),  # (u, d_v)
        "ids": torch.randint(0, 100, (3,), generator=gen),
    }


def assert_tensors_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def files_of(directory) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


# ---------------------------------------------------------------------- create / open
def test_create_then_open_roundtrips_meta(state_dir):
    assert not is_state_dir(state_dir)
    with StateStore.create(state_dir, META) as store:
        assert store.meta == META
        assert store.journal_count == 0
        assert store.snapshot_covers_seq is None
    assert is_state_dir(state_dir)
    with StateStore.open(state_dir) as store:
        assert store.meta == META
        assert store.journal_count == 0


def test_manifest_is_indented_sorted_json_with_a_self_checksum(state_dir):
    StateStore.create(state_dir, META).close()
    text = (state_dir / "manifest.json").read_text()
    obj = json.loads(text)
    assert text == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert obj["format_version"] == 1 and obj["meta"] == META
    assert obj["journal"] == {"count": 0, "head_sha256": None}
    assert len(obj["manifest_sha256"]) == 64


def test_meta_is_stored_as_its_json_round_trip(state_dir):
    with StateStore.create(state_dir, {"layers": (3, 4), "lam": 1e-3}) as store:
        assert store.meta == {"layers": [3, 4], "lam": 1e-3}
        store.meta["layers"].append(99)  # a copy: the store is unaffected
        assert store.meta["layers"] == [3, 4]


@pytest.mark.parametrize(
    "bad_meta, message",
    [({1: "x"}, "not a str"), ({"x": float("nan")}, "JSON"), ({"x": object()}, "JSON"), (["x"], "dict")],
)
def test_create_refuses_meta_json_cannot_hold_and_touches_nothing(state_dir, bad_meta, message):
    with pytest.raises(StateError, match=message):
        StateStore.create(state_dir, bad_meta)
    assert not state_dir.exists()


def test_create_refuses_existing_state_dir_and_non_empty_dir(state_dir, tmp_path):
    StateStore.create(state_dir, META).close()
    before = files_of(state_dir)
    with pytest.raises(StateError, match="already a state directory"):
        StateStore.create(state_dir, META)
    assert files_of(state_dir) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StateError, match="not empty.*notes.txt"):
        StateStore.create(other, META)
    assert files_of(other) == ["notes.txt"]

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StateError, match="is a file"):
        StateStore.create(tmp_path / "a_file", META)


def test_create_accepts_leftovers_of_an_interrupted_create(state_dir):
    (state_dir / "journal").mkdir(parents=True)
    (state_dir / ".lock").write_text("123\n")
    (state_dir / f"{TEMP_PREFIX}manifest.json-0a1b").write_text("{")
    with StateStore.create(state_dir, META) as store:
        assert store.meta == META
    assert files_of(state_dir) == [".lock", "manifest.json"]


def test_create_makes_parents_and_accepts_an_empty_directory(tmp_path):
    StateStore.create(tmp_path / "a" / "b", META).close()
    assert is_state_dir(tmp_path / "a" / "b")
    (tmp_path / "empty").mkdir()
    StateStore.create(tmp_path / "empty", META).close()
    assert is_state_dir(tmp_path / "empty")


def test_open_refuses_missing_and_non_state_directories(tmp_path):
    with pytest.raises(StateError, match="no state directory"):
        StateStore.open(tmp_path / "missing")
    with pytest.raises(StateError, match="not a state directory"):
        StateStore.open(tmp_path)


def test_missing_manifest_next_to_state_files_is_corruption(state_dir):
    with StateStore.create(state_dir, META) as store:
        store.append("edit", {}, make_tensors(0))
    (state_dir / "manifest.json").unlink()
    with pytest.raises(StateCorruptError, match="manifest.json is missing"):
        StateStore.open(state_dir)


def test_store_holds_the_lock_until_closed(state_dir):
    store = StateStore.create(state_dir, META)
    with pytest.raises(StateLockedError, match=str(os.getpid())):
        StateStore.open(state_dir)
    store.close()
    assert store.closed
    with pytest.raises(StateError, match="closed"):
        store.append("edit", {}, {})
    StateStore.open(state_dir).close()


def test_newer_format_version_is_refused_with_upgrade_hint(state_dir):
    StateStore.create(state_dir, META).close()
    path = state_dir / "manifest.json"
    obj = json.loads(path.read_text())
    obj["format_version"] = 2
    path.write_text(json.dumps(obj))
    with pytest.raises(StateError, match="format_version 2.*upgrade"):
        StateStore.open(state_dir)


# ---------------------------------------------------------------------- metadata
def test_update_meta_merges_and_persists(state_dir):
    with StateStore.create(state_dir, META) as store:
        store.update_meta({"edits_done": 3, "method": "memit"})
    with StateStore.open(state_dir) as store:
        assert store.meta == {**META, "edits_done": 3, "method": "memit"}
        with pytest.raises(StateError, match="JSON"):
            store.update_meta({"bad": float("inf")})
        assert store.meta["edits_done"] == 3


def test_check_compatible_names_key_expected_and_found(state_dir):
    with StateStore.create(state_dir, META) as store:
        store.check_compatible({"layers": (1, 2), "model": {"spec": "tiny", "fingerprint": "ab12"}})
        with pytest.raises(StateMismatchError) as info:
            store.check_compatible({"method": "rlsedit", "layers": [1, 3]})
        assert "layers expected [1,3], found [1,2]" in str(info.value)
        with pytest.raises(StateMismatchError, match="no 'dtype'"):
            store.check_compatible({"dtype": "float32"})
        with pytest.raises(StateMismatchError, match="expected 1.0, found 1"):
            store.update_meta({"n": 1})
            store.check_compatible({"n": 1.0})


# ---------------------------------------------------------------------- snapshots
def test_snapshot_roundtrip_is_bit_exact_for_several_dtypes(state_dir):
    tensors = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(2, dtype=torch.float64),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.arange(6).reshape(2, 3),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    with StateStore.create(state_dir, META) as store:
        store.write_snapshot(tensors, {"step": 0}, covers_seq=0)
    with StateStore.open(state_dir) as store:
        got, meta, covers = store.read_snapshot()
    assert_tensors_equal(got, tensors)
    assert meta == {"step": 0} and covers == 0
    got["f32"].add_(1.0)  # returned tensors are ordinary, writable tensors


def test_snapshot_copies_views_and_non_contiguous_tensors(state_dir):
    base = torch.randn(4, 6)
    tensors = {"W": base, "W_T": base.t(), "row": base[1], "cols": base[:, ::2]}
    with StateStore.create(state_dir, META) as store:
        store.write_snapshot(tensors, {}, covers_seq=0)
        base.zero_()  # the stored copy must not alias the caller's memory
        got, _, _ = store.read_snapshot()
    assert not torch.equal(got["W"], base)
    assert torch.equal(got["W_T"], got["W"].t()) and torch.equal(got["cols"], got["W"][:, ::2])


def test_new_snapshot_replaces_older_files(state_dir):
    with StateStore.create(state_dir, META) as store:
        with pytest.raises(StateError, match="no snapshot"):
            store.read_snapshot()
        store.write_snapshot({"W": torch.zeros(2)}, {"v": 0}, covers_seq=0)
        for i in range(3):
            store.append("edit", {}, make_tensors(i))
        store.write_snapshot({"W": torch.ones(2)}, {"v": 1}, covers_seq=2)
        store.write_snapshot({"W": torch.full((2,), 2.0)}, {"v": 2}, covers_seq=2)  # same covers_seq
        snapshots = [p.name for p in state_dir.glob("snapshot-*")]
        assert len(snapshots) == 1 and snapshots[0].startswith("snapshot-00000002-")
        assert store.snapshot_covers_seq == 2
    with StateStore.open(state_dir) as store:
        got, meta, covers = store.read_snapshot()
    assert torch.equal(got["W"], torch.full((2,), 2.0)) and meta == {"v": 2} and covers == 2


@pytest.mark.parametrize("covers_seq", [-1, 2, 1.0, True, "0"])
def test_snapshot_covers_seq_must_be_within_the_journal(state_dir, covers_seq):
    with StateStore.create(state_dir, META) as store:
        store.append("edit", {}, {})
        with pytest.raises(StateError, match="covers_seq"):
            store.write_snapshot({"W": torch.zeros(1)}, {}, covers_seq=covers_seq)
        assert list(state_dir.glob("snapshot-*")) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_refused_and_nothing_is_written(state_dir, value):
    bad = {"ok": torch.zeros(3), "bad": torch.tensor([1.0, value])}
    with StateStore.create(state_dir, META) as store:
        before = files_of(state_dir)
        with pytest.raises(NumericalError, match="'bad'"):
            store.write_snapshot(bad, {}, covers_seq=0)
        with pytest.raises(NumericalError, match="'bad'"):
            store.append("edit", {}, bad)
        assert store.journal_count == 0 and store.snapshot_covers_seq is None
        assert files_of(state_dir) == before


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"x": [1.0]}, "torch.Tensor"),
        ({"": torch.zeros(1)}, "non-empty"),
        ({"__metadata__": torch.zeros(1)}, "non-empty"),
        ({"s": torch.zeros(3).to_sparse()}, "dense"),
    ],
)
def test_bad_tensor_dicts_are_refused(state_dir, tensors, message):
    with StateStore.create(state_dir, META) as store:
        with pytest.raises(StateError, match=message):
            store.append("edit", {}, tensors)
        assert store.journal_count == 0


# ---------------------------------------------------------------------- journal
def test_append_returns_consecutive_seqs_and_entries_roundtrip(state_dir):
    with StateStore.create(state_dir, META) as store:
        seqs = [store.append("edit", {"batch": i, "requests": ["a", "b"]}, make_tensors(i)) for i in range(5)]
        assert seqs == [0, 1, 2, 3, 4] and store.journal_count == 5
    with StateStore.open(state_dir) as store:
        entries = list(store.entries())
        assert [e.seq for e in entries] == seqs
        for entry in entries:
            assert isinstance(entry, JournalEntry)
            assert entry.kind == "edit" and entry.meta == {"batch": entry.seq, "requests": ["a", "b"]}
            assert_tensors_equal(entry.tensors, make_tensors(entry.seq))
        assert [e.seq for e in store.entries(start_seq=3)] == [3, 4]
        assert list(store.entries(start_seq=5)) == []
        with pytest.raises(StateError, match="start_seq"):
            store.entries(start_seq=6)


def test_entries_form_a_hash_chain_ending_at_the_manifest_head(state_dir):
    with StateStore.create(state_dir, META) as store:
        for i in range(3):
            store.append("edit", {}, make_tensors(i))
    journal = state_dir / "journal"
    blobs = [(journal / entry_file_name(i)).read_bytes() for i in range(3)]
    headers = [read_entry_header(b, journal / entry_file_name(i)) for i, b in enumerate(blobs)]
    assert headers[0].prev_sha256 == ""
    assert headers[1].prev_sha256 == sha256_hex(blobs[0])
    assert headers[2].prev_sha256 == sha256_hex(blobs[1])
    manifest = json.loads((state_dir / "manifest.json").read_text())
    assert manifest["journal"] == {"count": 3, "head_sha256": sha256_hex(blobs[2])}


@pytest.mark.parametrize("kind", ["", "has space", "x" * 65, 3, None])
def test_bad_kind_is_refused(state_dir, kind):
    with StateStore.create(state_dir, META) as store:
        with pytest.raises(StateError, match="kind"):
            store.append(kind, {}, {})
        assert store.journal_count == 0


def test_append_cost_does_not_depend_on_history(state_dir):
    """The manifest stays the same size, and append never reads older entries."""
    with StateStore.create(state_dir, META) as store:
        for i in range(10):
            store.append("edit", {}, make_tensors(i))
        size_at_10 = (state_dir / "manifest.json").stat().st_size
        for i in range(10, 40):
            store.append("edit", {}, make_tensors(i))
        # same number of digits in the count (10 vs 40): same manifest size
        assert (state_dir / "manifest.json").stat().st_size == size_at_10
        # with every older entry moved away, append still works: it never reads them
        hidden = state_dir.parent / "hidden"
        shutil.move(state_dir / "journal", hidden)
        (state_dir / "journal").mkdir()
        assert store.append("edit", {}, make_tensors(40)) == 40
        for path in hidden.iterdir():
            shutil.move(path, state_dir / "journal" / path.name)
    with StateStore.open(state_dir) as store:
        assert store.journal_count == 41


def test_failed_manifest_write_stops_the_store_and_reopen_recovers(state_dir, monkeypatch):
    with StateStore.create(state_dir, META) as store:
        store.append("edit", {"i": 0}, make_tensors(0))

        def disk_full(path, obj):
            raise StateError(f"could not write {path}: [Errno 28] No space left on device")

        monkeypatch.setattr(store_module, "atomic_write_json", disk_full)
        with pytest.raises(StateError, match="No space left"):
            store.append("edit", {"i": 1}, make_tensors(1))
        monkeypatch.undo()
        assert store.journal_count == 1  # not acknowledged
        with pytest.raises(StateError, match="failed write.*open the directory again"):
            store.append("edit", {"i": 1}, make_tensors(1))
    with StateStore.open(state_dir) as store:
        assert store.journal_count == 1
        assert [e.meta for e in store.entries()] == [{"i": 0}]
        assert store.append("edit", {"i": 1}, make_tensors(1)) == 1


# ---------------------------------------------------------------------- crash recovery
def test_open_removes_an_unacknowledged_entry_beyond_the_head(state_dir, caplog):
    with StateStore.create(state_dir, META) as store:
        for i in range(2):
            store.append("edit", {}, make_tensors(i))
        manifest_before = (state_dir / "manifest.json").read_bytes()
        store.append("edit", {}, make_tensors(2))
    # crash after the entry file but before the manifest: roll the manifest back
    (state_dir / "manifest.json").write_bytes(manifest_before)
    with caplog.at_level(logging.WARNING):
        with StateStore.open(state_dir) as store:
            assert store.journal_count == 2
            assert [e.seq for e in store.entries()] == [0, 1]
            assert not (state_dir / "journal" / entry_file_name(2)).exists()
            assert store.append("edit", {"again": True}, make_tensors(7)) == 2
    assert "unacknowledged journal entry" in caplog.text and entry_file_name(2) in caplog.text
    with StateStore.open(state_dir) as store:
        last = list(store.entries(2))[0]
        assert last.meta == {"again": True}
        assert_tensors_equal(last.tensors, make_tensors(7))


def test_open_removes_temp_files_and_orphan_snapshots(state_dir, caplog):
    with StateStore.create(state_dir, META) as store:
        store.write_snapshot({"W": torch.zeros(2)}, {}, covers_seq=0)
    current = [p.name for p in state_dir.glob("snapshot-*")]
    (state_dir / "snapshot-00000000-000000000000.safetensors").write_bytes(b"orphan")
    (state_dir / f"{TEMP_PREFIX}manifest.json-1234").write_bytes(b"{")
    (state_dir / "journal" / f"{TEMP_PREFIX}00000000.safetensors-99").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        StateStore.open(state_dir).close()
    assert files_of(state_dir) == sorted([".lock", "manifest.json", *current])
    assert caplog.text.count("removed") == 3


class SimulatedCrash(BaseException):
    """Stands for the process dying at this instant (nothing after it runs)."""


def crash_at_operation(monkeypatch, n: int) -> list[str]:
    """Make the n-th os.fsync/os.replace/os.unlink call raise SimulatedCrash instead of running."""
    log: list[str] = []
    for name in ("fsync", "replace", "unlink"):
        real = getattr(os, name)

        def hooked(*args, _real=real, _name=name, **kwargs):
            if len(log) == n:
                raise SimulatedCrash(_name)
            log.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, hooked)
    return log


@pytest.mark.parametrize("operation", ["append", "snapshot", "update_meta"])
def test_crash_at_every_step_leaves_the_old_or_the_new_state(tmp_path, monkeypatch, operation):
    """Stop the write at each fsync/rename/unlink in turn; reopening gives old or new, whole."""
    base = tmp_path / "base"
    with StateStore.create(base, META) as store:
        store.write_snapshot({"W": torch.zeros(3)}, {"v": 0}, covers_seq=0)
        store.append("edit", {"i": 0}, make_tensors(0))

    def run(store):
        if operation == "append":
            store.append("edit", {"i": 1}, make_tensors(1))
        elif operation == "snapshot":
            store.write_snapshot({"W": torch.ones(3)}, {"v": 1}, covers_seq=1)
        else:
            store.update_meta({"extra": 1})

    def observe(directory):
        with StateStore.open(directory) as store:
            tensors, snapshot_meta, covers = store.read_snapshot()
            entries = [(e.seq, e.meta, e.tensors["ids"].tolist()) for e in store.entries()]
            state = (store.meta, store.journal_count, tensors["W"].tolist(), snapshot_meta, covers, entries)
        # nothing half-written is left visible
        assert list(directory.rglob(f"{TEMP_PREFIX}*")) == []
        assert len(list(directory.glob("snapshot-*"))) == 1
        assert sorted(p.name for p in (directory / "journal").iterdir()) == [
            entry_file_name(i) for i in range(state[1])
        ]
        return state

    old = observe(base)
    outcomes = []
    for crash_at in range(100):
        scratch = tmp_path / f"crash{crash_at}"
        shutil.copytree(base, scratch)
        store = StateStore.open(scratch)
        with monkeypatch.context() as patch:
            crash_at_operation(patch, crash_at)
            try:
                run(store)
                crashed = False
            except SimulatedCrash:
                crashed = True
        store.close()  # the kernel drops a dead process's lock
        state = observe(scratch)
        if not crashed:
            new = state
            break
        outcomes.append(state)
    assert new != old
    assert all(state in (old, new) for state in outcomes)
    # both sides of the commit point were hit: early crashes keep old, late ones give new
    assert outcomes[0] == old and outcomes[-1] == new, (len(outcomes), operation)
