"""Bad input never damages state: malformed requests, impossible operations and numerically
bad edits are refused with one clear error, and the state stays exactly as it was.

"Exactly" means every byte of the state directory (lock file aside), hence the weights
sha256 and the journal count too. Numerically bad edits are injected by poisoning what the
locate step returns for one edit (its keys or its value target), in this process.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from session_tiny import (MAX_POSITIONS, assert_one_line_error, build_world, cli, cli_status, edit_records,
                          make_state, one_thread, state_files, tiny_runtime, write_jsonl)

import rlsedit.locate.fasttargets as fasttargets_module
import rlsedit.locate.keys as keys_module
from rlsedit.errors import NumericalError
from rlsedit.requests import parse_request
from rlsedit.session.session import Session

__all__ = ["one_thread"]  # autouse fixture, imported for its effect

N_EDITS = 6
GOOD = edit_records(2, start=100)  # valid edits placed before each bad one: none may be applied


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    world = build_world(root / "world")
    state = root / "state"
    make_state(world, state, edit_records(N_EDITS), journal_only=0)
    return world, state, cli_status(world, state)


@pytest.fixture
def state(pristine, tmp_path):
    copy = tmp_path / "state"
    shutil.copytree(pristine[1], copy)
    return copy


def _unchanged(world, state, before_files, before_status) -> None:
    assert state_files(state) == before_files
    after = cli_status(world, state)
    assert after["weights_sha256"] == before_status["weights_sha256"]
    assert after["journal_entries"] == before_status["journal_entries"]


LONG_SUBJECT = " ".join(["Eiffel Tower"] * MAX_POSITIONS)

BAD_RECORDS = {
    "missing subject": ({"id": "x", "prompt": "{} is in", "target_new": "Rome"}, "missing field 'subject'"),
    "empty target": ({"id": "x", "prompt": "{} is in", "subject": "Paris", "target_new": "  "},
                     "'target_new' is empty"),
    "non-string target": ({"id": "x", "prompt": "{} is in", "subject": "Paris", "target_new": 7},
                          "'target_new' must be a non-empty string"),
    "target object without str": ({"id": "x", "prompt": "{} is in", "subject": "Paris",
                                   "target_new": {"id": "Q90"}}, "'target_new' must be a non-empty string"),
    "subject not in prompt": ({"id": "x", "prompt": "It is in", "subject": "Paris", "target_new": "Rome"},
                              "does not occur in prompt"),
    "two slots": ({"id": "x", "prompt": "{} and {}", "subject": "Paris", "target_new": "Rome"},
                  "2 '{}' slots"),
    "non-object record": (["Paris", "Rome"], "expected a JSON object"),
    "bool id": ({"id": True, "prompt": "{} is in", "subject": "Paris", "target_new": "Rome"},
                "'id' must be a string or an integer"),
    "duplicate id": ({"id": "e100", "prompt": "{} is in", "subject": "Paris", "target_new": "Rome"},
                     "occurs twice"),
    "prompt over the context": ({"id": "x", "prompt": "{} is in", "subject": LONG_SUBJECT, "target_new": "Rome"},
                                f"over the model's context of {MAX_POSITIONS}"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_request_is_refused_and_nothing_is_applied(case, pristine, state, tmp_path):
    world, _, before_status = pristine
    record, needle = BAD_RECORDS[case]
    edits = write_jsonl(tmp_path / "edits.jsonl", [*GOOD, record])
    before = state_files(state)
    code, out, err = cli(world.edit_args(state, edits))
    assert_one_line_error(code, err, needle)
    assert out == ""
    _unchanged(world, state, before, before_status)


@pytest.mark.parametrize("content, needle", [
    (b'{"id": "a", "prompt": "{} is", "subject": "Paris", "target_new": "Rome"}\n{"id": "b", "prompt":\n',
     "line 2: invalid JSON"),
    (b'[{"id": "a", "prompt": "{} is", "subject": "Paris", "target_new": "Rome"},', "invalid JSON"),
    (b'\xff\xfe{"id": "a"}\n', "is not UTF-8 text"),
], ids=["truncated jsonl", "truncated json list", "not utf-8"])
def test_an_unreadable_edit_file_is_refused(content, needle, pristine, state, tmp_path):
    world, _, before_status = pristine
    path = tmp_path / "edits.jsonl"
    path.write_bytes(content)
    before = state_files(state)
    code, _, err = cli(world.edit_args(state, path))
    assert_one_line_error(code, err, needle, str(path))
    _unchanged(world, state, before, before_status)


def test_a_missing_edit_file_and_a_bad_batch_size_are_refused(pristine, state, tmp_path):
    world, _, before_status = pristine
    before = state_files(state)
    code, _, err = cli(world.edit_args(state, tmp_path / "nope.jsonl"))
    assert_one_line_error(code, err, "does not exist")
    edits = write_jsonl(tmp_path / "edits.jsonl", GOOD)
    code, _, err = cli(world.edit_args(state, edits, batch_size=0))
    assert_one_line_error(code, err, "batch size must be a positive integer")
    _unchanged(world, state, before, before_status)


def test_undo_of_an_unknown_or_undone_id_is_refused(pristine, state):
    world, _, before_status = pristine
    before = state_files(state)
    code, _, err = cli(["undo", "--state", str(state), "--edit", "no-such-edit", "--cache-dir", str(world.cache)])
    assert_one_line_error(code, err, "cannot undo edit 'no-such-edit'", "no such edit")
    _unchanged(world, state, before, before_status)

    code, out, err = cli(["undo", "--state", str(state), "--edit", "e3", "--cache-dir", str(world.cache)])
    assert code == 0, err
    after_undo = cli_status(world, state)
    assert after_undo["edits_undone"] == 1 and after_undo["weights_sha256"] != before_status["weights_sha256"]
    before = state_files(state)
    code, _, err = cli(["undo", "--state", str(state), "--edit", "e3", "--cache-dir", str(world.cache)])
    assert_one_line_error(code, err, "already undone")
    _unchanged(world, state, before, after_undo)


def test_an_undone_edit_submitted_again_is_applied_again(pristine, state, tmp_path):
    world, _, before_status = pristine
    assert cli(["undo", "--state", str(state), "--edit", "e3", "--cache-dir", str(world.cache)])[0] == 0
    again = write_jsonl(tmp_path / "again.jsonl", [edit_records(N_EDITS)[3]])
    code, out, err = cli(world.edit_args(state, again, "--json"))
    assert code == 0, err
    report = json.loads(out)
    assert report["applied"] == 1 and report["already_applied"] == 0, report
    after = cli_status(world, state)
    assert after["edits_applied"] == before_status["edits_applied"] and after["edits_undone"] == 0
    # a second submission of the same file finds it live: nothing more is applied
    code, out, err = cli(world.edit_args(state, again, "--json"))
    assert code == 0 and json.loads(out)["already_applied"] == 1, (out, err)


def test_a_new_state_with_an_unknown_method_or_bad_hparams_is_not_created(pristine, tmp_path):
    """(Before the fix, hyperparameters that failed their own checks, e.g. descending
    layers, ended the CLI with a ValueError traceback.)"""
    world = pristine[0]
    edits = write_jsonl(tmp_path / "edits.jsonl", GOOD)
    code, _, err = cli(world.edit_args(tmp_path / "s1", edits, "--method", "nonsense"))
    assert_one_line_error(code, err, "unknown method 'nonsense'")
    bad = tmp_path / "bad.json"
    for hparams, needle in (({"layers": [2, 1]}, "layers must be distinct non-negative ascending"),
                            ({"mom2_n_samples": -5}, "mom2_n_samples must be an integer >= 1, got -5"),
                            ({"v_lr": "fast"}, "v_lr must be a finite number > 0 or None, got 'fast'")):
        bad.write_text(json.dumps(hparams))
        args = world.edit_args(tmp_path / "s2", edits)
        args[args.index("--hparams") + 1] = str(bad)
        code, _, err = cli(args)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


# ---- numerically bad edits ---------------------------------------------------------------------

def poison_keys(monkeypatch, bad_id: str, *, value: float | None = None, scale: float | None = None) -> None:
    """compute_keys returns keys whose column for ``bad_id`` is ``value`` or scaled by ``scale``."""
    real = keys_module.compute_keys

    def poisoned(lm, layer, requests, prefixes, **kwargs):
        K = real(lm, layer, requests, prefixes, **kwargs)  # (d_k, u)
        for column, request in enumerate(requests):
            if request.id == bad_id:
                K[:, column] = value if value is not None else K[:, column] * scale
        return K

    monkeypatch.setattr(keys_module, "compute_keys", poisoned)


def poison_targets(monkeypatch, bad_id: str) -> None:
    """The editors' value-target entry point returns an infinite target z for ``bad_id``."""
    real = fasttargets_module.compute_value_targets

    def poisoned(lm, layer, requests, prefixes, config=None, **kwargs):
        result = real(lm, layer, requests, prefixes, config, **kwargs)
        for row, request in enumerate(requests):
            if request.id == bad_id:
                result.z[row, 0] = float("inf")  # z: (u, d_model)
        return result

    monkeypatch.setattr(fasttargets_module, "compute_value_targets", poisoned)


POISONS = {
    "nan key": (lambda mp: poison_keys(mp, "bad", value=float("nan")), "layers.1.K has non-finite values"),
    "inf value target": (lambda mp: poison_targets(mp, "bad"), "value target z has non-finite values"),
    # ‖k‖ ~ 1e22: KᵀCK overflows float32, so S = I + KᵀCK is not finite
    "overflowing key": (lambda mp: poison_keys(mp, "bad", scale=1e22), "S = I + K^T C K"),
    # ‖k‖ × 1e12: S is finite and C − HHᵀ keeps a positive diagonal, but λ_max(S) ~ 1e23 > 1/eps
    "ill-conditioned S": (lambda mp: poison_keys(mp, "bad", scale=1e12), "S = I + K^T C K has largest eigenvalue"),
}


def _requests(records):
    return [parse_request(r, i) for i, r in enumerate(records)]


def _bad_record():
    return {"id": "bad", "prompt": "{} plays the", "subject": "Michael Jordan", "target_new": "piano"}


@pytest.mark.parametrize("case", sorted(POISONS))
def test_a_numerically_bad_edit_is_refused_before_anything_is_written(case, pristine, state, monkeypatch):
    world, _, before_status = pristine
    poison, why = POISONS[case]
    poison(monkeypatch)
    before = state_files(state)
    with Session.open(state, runtime=tiny_runtime(world)) as session:
        editor_before = {k: v.clone() for k, v in session.editor.state_dict().items()}
        with pytest.raises(NumericalError) as caught:
            session.edit(_requests([_bad_record()]), batch_size=1)
        message = str(caught.value)
        assert message.startswith("edit bad: ") and why in message and "nothing was applied" in message
        assert "\n" not in message
        after = session.editor.state_dict()
        assert all(torch.equal(after[k], editor_before[k]) for k in editor_before)
        assert session.store.journal_count == before_status["journal_entries"]
        # and in a batch with good edits: the batch is named, and none of it is applied
        with pytest.raises(NumericalError, match=r"^batch of edits e100, bad: "):
            session.edit(_requests([GOOD[0], _bad_record()]), batch_size=2)
        assert all(torch.equal(session.editor.state_dict()[k], editor_before[k]) for k in editor_before)
    _unchanged(world, state, before, before_status)


def test_skip_bad_applies_the_rest_exactly_as_if_the_bad_edit_never_was(pristine, tmp_path, monkeypatch):
    """With ``skip_bad`` the batch holding a bad edit is retried one edit at a time; the
    result is bit-identical to a stream that had those batches and no bad edit."""
    world, source, _ = pristine
    good = edit_records(5, start=200)
    stream = [good[0], _bad_record(), *good[1:]]  # batches of 2: [g0, bad] [g1, g2] [g3, g4]
    with_bad, without = tmp_path / "with-bad", tmp_path / "without"
    shutil.copytree(source, with_bad)
    shutil.copytree(source, without)
    with monkeypatch.context() as mp:
        poison_keys(mp, "bad", value=float("nan"))
        with Session.open(with_bad, runtime=tiny_runtime(world)) as session:
            report = session.edit(_requests(stream), batch_size=2, skip_bad=True)
    assert report.applied == [r["id"] for r in good]
    assert [s["id"] for s in report.skipped] == ["bad"]
    assert "non-finite" in report.skipped[0]["error"]
    with Session.open(without, runtime=tiny_runtime(world)) as session:
        session.edit(_requests(good[:1]), batch_size=1)
        session.edit(_requests(good[1:]), batch_size=2)
    assert cli_status(world, with_bad)["weights_sha256"] == cli_status(world, without)["weights_sha256"]


def test_skip_bad_resumed_after_a_crash_forms_the_same_batches(pristine, tmp_path, monkeypatch):
    """A crash right after ``skip_bad`` split a batch: the rerun must not regroup the rest.
    (Before the fix, batches were cut from what was left to do, so the rerun grouped
    [bad, g2] [g3, g4] [g5] instead of [bad] [g2, g3] [g4, g5], and ended elsewhere.)"""
    world, source, _ = pristine
    good = edit_records(6, start=300)
    stream = _requests([good[0], _bad_record(), *good[1:]])
    uninterrupted, crashed = tmp_path / "uninterrupted", tmp_path / "crashed"
    shutil.copytree(source, uninterrupted)
    shutil.copytree(source, crashed)
    poison_keys(monkeypatch, "bad", value=float("nan"))
    with Session.open(uninterrupted, runtime=tiny_runtime(world)) as session:
        session.edit(stream, batch_size=2, skip_bad=True)

    class Killed(BaseException):
        pass

    session = Session.open(crashed, runtime=tiny_runtime(world))
    real_append, calls = session.store.append, []

    def append_then_die(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # dies before the second entry is written: only g0 is acknowledged
            raise Killed()
        return real_append(*args, **kwargs)

    session.store.append = append_then_die
    with pytest.raises(Killed):
        session.edit(stream, batch_size=2, skip_bad=True)
    session.close(snapshot=False)
    with Session.open(crashed, runtime=tiny_runtime(world)) as session:
        report = session.edit(stream, batch_size=2, skip_bad=True)
    assert report.already_applied == [good[0]["id"]]
    assert [s["id"] for s in report.skipped] == ["bad"]
    assert cli_status(world, crashed)["weights_sha256"] == cli_status(world, uninterrupted)["weights_sha256"]


def test_cli_names_the_bad_edit_and_skip_bad_reports_it(pristine, state, tmp_path, monkeypatch):
    world, _, before_status = pristine
    poison_targets(monkeypatch, "bad")
    edits = write_jsonl(tmp_path / "edits.jsonl", [_bad_record(), *GOOD])
    before = state_files(state)
    code, _, err = cli(world.edit_args(state, edits))
    assert_one_line_error(code, err, "edit bad: value target z has non-finite values")
    _unchanged(world, state, before, before_status)

    code, out, err = cli(world.edit_args(state, edits, "--skip-bad", "--json"))
    assert code == 0, err
    report = json.loads(out)
    assert report["applied"] == len(GOOD) and report["edits_total"] == N_EDITS + len(GOOD)
    assert [s["id"] for s in report["skipped"]] == ["bad"]
    assert "non-finite" in report["skipped"][0]["error"]
    code, out, err = cli(world.edit_args(state, edits, "--skip-bad"))  # text mode: skipped edits on stderr
    assert code == 0 and "applied 0 edits (2 already applied)" in out
    assert err.strip().splitlines()[-1].startswith("skipped bad: edit bad: value target z")
