"""A damaged state, or one made for another model or other settings, is refused by the CLI.

Every refusal is exit code 2 with one ``rlsedit: error:`` line that names the file (damage)
or what differs (mismatch), and leaves every byte of the state directory as it was. The
CLI runs in this process through :func:`rlsedit.cli.main` (the code ``python -m rlsedit``
runs); one case also runs as a real subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from session_tiny import (assert_one_line_error, build_world, cli, cli_status, edit_records, make_state,
                          one_thread, run_rlsedit, save_tiny_llama, state_files, write_jsonl)

__all__ = ["one_thread"]  # autouse fixture, imported for its effect

N_EDITS = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("corruption")
    world = build_world(root / "world")
    state = root / "state"
    make_state(world, state, edit_records(N_EDITS))
    return world, state, cli_status(world, state)


@pytest.fixture
def state(pristine, tmp_path):
    world, source, _ = pristine
    copy = tmp_path / "state"
    shutil.copytree(source, copy)
    return copy


def _snapshot(d: Path) -> Path:
    (path,) = d.glob("snapshot-*.safetensors")
    return path


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest_value(d: Path) -> None:
    manifest = d / "manifest.json"
    text = manifest.read_text()
    assert '"rlsedit"' in text
    manifest.write_text(text.replace('"rlsedit"', '"memit"', 1))  # valid JSON, a changed value


def _swap_entries(d: Path) -> None:
    a, b = d / "journal" / "00000000.safetensors", d / "journal" / "00000001.safetensors"
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)


DAMAGE = {
    "manifest truncated": (lambda d: _truncate(d / "manifest.json"), lambda d: d / "manifest.json"),
    "manifest value edited": (_edit_manifest_value, lambda d: d / "manifest.json"),
    "snapshot truncated": (lambda d: _truncate(_snapshot(d)), _snapshot),
    "snapshot tensor byte flipped": (lambda d: _flip(_snapshot(d), 0.7), _snapshot),
    "snapshot deleted": (lambda d: _snapshot(d).unlink(), None),
    "first journal entry flipped": (lambda d: _flip(d / "journal" / "00000000.safetensors", 0.8),
                                    lambda d: d / "journal" / "00000000.safetensors"),
    # the last entry is replayed on open (not covered by the snapshot)
    "last journal entry truncated": (lambda d: _truncate(d / "journal" / "00000004.safetensors"),
                                     lambda d: d / "journal" / "00000004.safetensors"),
    "middle journal entry deleted": (lambda d: (d / "journal" / "00000002.safetensors").unlink(),
                                     lambda d: d / "journal" / "00000002.safetensors"),
    "journal entries swapped": (_swap_entries, None),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_status_refuses_a_damaged_state_naming_the_file(case, state, pristine):
    world = pristine[0]
    damage, named = DAMAGE[case]
    expected_name = str(named(state)) if named else None
    if case == "snapshot deleted":
        expected_name = _snapshot(state).name
    damage(state)
    before = state_files(state)
    code, out, err = cli(world.status_args(state))
    line = assert_one_line_error(code, err)
    if expected_name:
        assert expected_name in line
    else:  # a swap breaks the hash chain at one of the two entries; the message names a journal file
        assert str(state / "journal") in line
    assert out == ""
    assert state_files(state) == before


def test_damage_is_refused_by_a_real_process_too(state, pristine):
    world = pristine[0]
    _flip(state / "journal" / "00000001.safetensors", 0.9)
    before = state_files(state)
    done = run_rlsedit(world.status_args(state), threads=1)
    assert_one_line_error(done.returncode, done.stderr, str(state / "journal" / "00000001.safetensors"))
    assert state_files(state) == before


def test_edit_refuses_another_model(state, pristine, tmp_path):
    world = pristine[0]
    other = save_tiny_llama(tmp_path / "other-model", seed=1)  # same shapes, other weights
    edits = write_jsonl(tmp_path / "more.jsonl", edit_records(2, start=100))
    before = state_files(state)
    args = world.edit_args(state, edits)
    args[args.index("--model") + 1] = str(other)
    code, _, err = cli(args)
    assert_one_line_error(code, err, "was made for model", str(world.model), str(other))
    assert state_files(state) == before


def test_status_refuses_when_the_model_files_changed_under_the_same_path(pristine, tmp_path):
    world, source, _ = pristine
    # a world whose model directory is later overwritten by another model
    moved = tmp_path / "world"
    shutil.copytree(world.root, moved, ignore=shutil.ignore_patterns("cache"))
    from session_tiny import TinyWorld

    w2 = TinyWorld(root=moved, model=moved / "model", corpus=moved / "corpus.jsonl",
                   hparams=moved / "hparams.json", cache=moved / "cache")
    state = tmp_path / "state"
    make_state(w2, state, edit_records(2), journal_only=0)
    shutil.rmtree(w2.model)
    save_tiny_llama(w2.model, seed=7)
    before = state_files(state)
    code, _, err = cli(w2.status_args(state))
    assert_one_line_error(code, err, "was made for model weights", "refusing to mix them")
    assert state_files(state) == before


@pytest.mark.parametrize("changes", [{"layers": [2, 3]}, {"layers": [1]}, {"mu_reg": 2.0}],
                         ids=["other layers", "fewer layers", "other mu"])
def test_edit_refuses_other_hyperparameters(changes, state, pristine, tmp_path):
    """(Before the fix, ``--hparams`` on an existing state was ignored with a warning.)"""
    world = pristine[0]
    hparams = json.loads(world.hparams.read_text()) | changes
    (tmp_path / "h.json").write_text(json.dumps(hparams))
    edits = write_jsonl(tmp_path / "more.jsonl", edit_records(2, start=100))
    args = world.edit_args(state, edits)
    args[args.index("--hparams") + 1] = str(tmp_path / "h.json")
    before = state_files(state)
    code, _, err = cli(args)
    line = assert_one_line_error(code, err, "was made with other hyperparameters")
    for key in changes:
        assert key in line
    assert state_files(state) == before


def test_edit_refuses_another_method(state, pristine, tmp_path):
    world = pristine[0]
    edits = write_jsonl(tmp_path / "more.jsonl", edit_records(2, start=100))
    before = state_files(state)
    code, _, err = cli(world.edit_args(state, edits, "--method", "memit"))
    assert_one_line_error(code, err, "memit")
    assert state_files(state) == before


def test_the_same_model_given_relatively_is_accepted_from_any_directory(pristine, tmp_path, monkeypatch):
    """A local model spec is stored as an absolute path: the state opens from any working
    directory, and the same model named relatively is the same model. (Before the fix the
    relative spec was stored as typed, so ``status`` from elsewhere could not load it.)"""
    world = pristine[0]
    state = tmp_path / "state"
    edits = write_jsonl(tmp_path / "edits.jsonl", edit_records(2))
    monkeypatch.chdir(world.root)
    args = world.edit_args(state, edits)
    args[args.index("--model") + 1] = "model"  # relative to world.root
    code, _, err = cli(args)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    status = cli_status(world, state)
    assert status["model"] == str(world.model.resolve()) and status["edits_applied"] == 2
    code, _, err = cli(world.edit_args(state, edits))  # the absolute spec: same model, nothing to do
    assert code == 0, err
