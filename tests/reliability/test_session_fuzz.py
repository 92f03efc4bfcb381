"""Fuzz the session: damaged or forged state directories, and odd requests on a live session.

Decisions:

* Random byte damage to any file of a tiny session's state directory: ``Session.open`` either
  raises an ``RLSEditError`` subclass, or opens to exactly the original state (only bytes
  that carry no content — the lock file, manifest whitespace — may change harmlessly).
* A *forged* state (values changed and the checksums recomputed, through the store's own
  API): ``Session.open`` raises only ``RLSEditError`` subclasses, never another exception.
  Checksums cannot catch a forger; this checks that the session reads what it trusts with
  care. (Before the fix, e.g. a non-list ``prefixes`` or a ``config`` with descending
  layers escaped as TypeError/ValueError.)
* Random request text on a live session: each edit is applied, or refused with an
  ``RLSEditError`` leaving the weights, the solver state and the journal exactly as they were.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from session_tiny import build_world, cli_status, edit_records, make_state, one_thread, tiny_runtime

from rlsedit.errors import RLSEditError
from rlsedit.model.weights import weights_sha256
from rlsedit.requests import parse_request
from rlsedit.session.session import Session
from rlsedit.session.store import StateStore

__all__ = ["one_thread"]  # autouse fixture, imported for its effect

SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("session-fuzz")
    world = build_world(root / "world")
    state = root / "state"
    make_state(world, state, edit_records(6), journal_only=2)  # two entries replayed on open
    # what a successful open must find (read once, in this process, without touching `state`)
    scratch = root / "scratch"
    shutil.copytree(state, scratch)
    files = sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file())
    return world, state, files, summary(world, scratch)


def summary(world, directory) -> tuple:
    session = Session.open(directory, runtime=tiny_runtime(world))
    try:
        status = session.status()
    finally:
        session.close(snapshot=False)  # leave the directory as it was
    return status["weights_sha256"], status["journal_entries"], status["edits_applied"], status["layers"]


def mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "append"]))
    event(f"mutation: {kind}")
    size = len(data)
    if kind == "flip" and size:
        pos = draw(st.integers(0, size - 1))
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
    if kind == "truncate":
        return data[: draw(st.integers(0, max(size - 1, 0)))]
    if kind == "insert":
        pos = draw(st.integers(0, size))
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    if kind == "delete" and size:
        pos = draw(st.integers(0, size - 1))
        return data[:pos] + data[pos + draw(st.integers(1, 8)):]
    return data + draw(st.binary(min_size=1, max_size=16))


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_random_damage_is_refused_or_harmless(pristine, data):
    world, source, files, original = pristine
    name = data.draw(st.sampled_from(files), label="file")
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "state"
        shutil.copytree(source, directory)
        target = directory / name
        before = target.read_bytes()
        after = mutate(before, data.draw)
        target.write_bytes(after)
        try:
            found = summary(world, directory)
        except RLSEditError as exc:
            event(f"refused: {type(exc).__name__}")
            assert "\n" not in str(exc)
            return
        event(f"opened: {name}")
        assert found == original
        assert name == ".lock" or after == before or (
            name == "manifest.json" and after.split() == before.split()), (name, before, after)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8), st.sampled_from(["{}", "{} x", "rlsedit", "memit", "float64"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_forged_state_is_refused_with_a_clear_error_or_opens(pristine, data):
    world, source, _, _ = pristine
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "state"
        shutil.copytree(source, directory)
        with StateStore.open(directory) as store:
            meta = store.meta
            where = data.draw(st.sampled_from(["meta", "config", "model", "snapshot meta"]), label="where")
            event(f"forged: {where}")
            if where == "meta":
                key = data.draw(st.sampled_from(["layers", "prefixes", "method", "corpus", "config", "model"]))
                store.update_meta({key: data.draw(json_values, label="value")})
            elif where in ("config", "model"):
                section = dict(meta[where])
                key = data.draw(st.sampled_from(sorted(section) + ["unknown"]), label="key")
                section[key] = data.draw(json_values, label="value")
                store.update_meta({where: section})
            else:
                tensors, snap_meta, covers = store.read_snapshot()
                key = data.draw(st.sampled_from(sorted(snap_meta)), label="key")
                snap_meta[key] = data.draw(json_values, label="value")
                store.write_snapshot(tensors, snap_meta, covers_seq=covers)
        try:
            summary(world, directory)
            event("opened")
        except RLSEditError as exc:
            event(f"refused: {type(exc).__name__}")
            assert "\n" not in str(exc)


# ---- odd requests on a live session ------------------------------------------------------------

odd_text = st.one_of(
    st.text(max_size=20),
    st.lists(st.sampled_from(["Paris", " ", "{}", "<eos>", "<pad>", "\u200b", "é", "東京", "\t", ".", "s", "🙂",
                              "\x00", "Eiffel Tower"]), min_size=1, max_size=6).map("".join),
)


ODD_IDS = itertools.count()


@pytest.fixture(scope="module")
def live(pristine, tmp_path_factory):
    world, source, _, _ = pristine
    directory = tmp_path_factory.mktemp("live") / "state"
    shutil.copytree(source, directory)
    session = Session.open(directory, runtime=tiny_runtime(world))
    yield session
    session.close(snapshot=False)


@settings(max_examples=60, **SETTINGS)
@given(prompt=st.one_of(st.tuples(odd_text, odd_text).map("{}".join), odd_text),
       subject=st.one_of(odd_text.filter(str.strip), st.just("Eiffel Tower " * 60)),
       target=odd_text.filter(str.strip))
def test_odd_requests_are_applied_or_refused_cleanly(live, prompt, subject, target):
    record = {"id": f"odd-{next(ODD_IDS)}", "prompt": prompt, "subject": subject, "target_new": target}
    try:
        request = parse_request(record, 0)
    except RLSEditError:
        event("refused by the parser")
        return
    sha, count = weights_sha256(live.lm), live.store.journal_count
    state = {k: v.clone() for k, v in live.editor.state_dict().items()}
    try:
        report = live.edit([request])
    except RLSEditError as exc:
        event(f"refused: {type(exc).__name__}")
        assert "\n" not in str(exc)
        assert weights_sha256(live.lm) == sha and live.store.journal_count == count
        after = live.editor.state_dict()
        assert all(torch.equal(after[k], state[k]) for k in state)
        return
    event("applied")
    assert report.applied == [request.id] and live.store.journal_count == count + 1


def test_the_live_session_still_reopens_to_its_weights(live, pristine):
    """After the fuzzing above, the journal replays to exactly the live weights."""
    world = pristine[0]
    live.snapshot()
    sha = weights_sha256(live.lm)
    assert live.store.journal_count > 6
    live.close()
    assert cli_status(world, live.directory)["weights_sha256"] == sha
