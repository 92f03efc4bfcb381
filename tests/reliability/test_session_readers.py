"""Readers beside a writer: ``status``, ``ask``, ``export`` and ``eval`` open a state read-only.

They take no lock, so they work while an edit holds the directory; they write nothing; they
see the acknowledged state as of opening; and a read-only session refuses to change anything.
"""

from __future__ import annotations

import json

import pytest
import torch
from session_tiny import build_world, cli, edit_records, make_state, state_files, tiny_runtime

from rlsedit.errors import StateError
from rlsedit.model.weights import get_W
from rlsedit.requests import parse_request
from rlsedit.session import store as store_module
from rlsedit.session.session import Session
from rlsedit.session.store import StateStore


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("readers") / "world")


@pytest.fixture
def state(world, tmp_path):
    path = tmp_path / "state"
    make_state(world, path, edit_records(4), journal_only=1)
    return path


def _status(world, state) -> dict:
    code, out, err = cli(["status", "--state", str(state), "--json", "--cache-dir", str(world.cache)])
    assert code == 0, err
    return json.loads(out)


def test_status_and_ask_work_while_a_writer_holds_the_state_and_write_nothing(world, state):
    writer = Session.open(state, runtime=tiny_runtime(world))  # holds the exclusive lock
    try:
        before = state_files(state)
        status = _status(world, state)
        assert status["edits_applied"] == 4
        code, out, err = cli(["ask", "--state", str(state), "--json", "--cache-dir", str(world.cache),
                              "--max-new-tokens", "3", "Paris is located in"])
        assert code == 0, err
        assert isinstance(json.loads(out)["completion"], str)
        assert state_files(state) == before  # the readers wrote nothing (nor repaired the journal tail)
        # the writer goes on; a reader opened afterwards sees the new acknowledged batch
        writer.edit([parse_request(r, i) for i, r in enumerate(edit_records(1, start=50))])
        assert _status(world, state)["edits_applied"] == 5
        # a second writer is still refused
        code, _, err = cli(["undo", "--state", str(state), "--edit", "e0", "--cache-dir", str(world.cache)])
        assert code == 4 and "locked by" in err  # the lock's own exit code
    finally:
        writer.close()


def test_a_read_only_session_refuses_to_change_the_state(world, state):
    before = state_files(state)
    with Session.open(state, runtime=tiny_runtime(world), read_only=True) as reader:
        with pytest.raises(StateError, match="opened read-only"):
            reader.edit([parse_request(edit_records(1, start=60)[0], 0)])
        with pytest.raises(StateError, match="opened read-only"):
            reader.undo("e0")
        with pytest.raises(StateError, match="opened read-only"):
            reader.store.append("batch", {}, {})
    assert state_files(state) == before


def test_a_reader_sees_the_same_weights_as_the_writer(world, state):
    with Session.open(state, runtime=tiny_runtime(world), read_only=True) as reader:
        read = {l: get_W(reader.lm, l) for l in reader.editor.layers}
    with Session.open(state, runtime=tiny_runtime(world)) as writer:
        for l, W in read.items():
            assert torch.equal(W, get_W(writer.lm, l))


def test_a_snapshot_replaced_while_a_reader_opens_is_read_again(world, state, monkeypatch):
    """The one race: the writer swaps the snapshot (and deletes the old file) between the
    reader's manifest read and its snapshot read. The reader notices the manifest moved and
    reads again, and gets the new state."""
    writer = Session.open(state, runtime=tiny_runtime(world))
    real = store_module._read_snapshot_file
    calls = []

    def racing(directory, ref):
        calls.append(ref.file)
        if len(calls) == 1:
            writer.edit([parse_request(edit_records(1, start=70)[0], 0)])
            writer.snapshot()  # new snapshot file; the old one (``ref``) is removed
        return real(directory, ref)

    monkeypatch.setattr(store_module, "_read_snapshot_file", racing)
    try:
        store, snapshot = StateStore.open_read_only(state)
        assert len(calls) == 2 and calls[0] != calls[1]
        assert store.journal_count == writer.store.journal_count and snapshot[2] == store.journal_count
        store.close()
    finally:
        writer.close()


def test_damage_is_still_refused_when_nothing_moved(world, state):
    snapshot = next(state.glob("snapshot-*.safetensors"))
    data = bytearray(snapshot.read_bytes())
    data[-1] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum|sha256"):
        StateStore.open_read_only(state)
