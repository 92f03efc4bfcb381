"""One bad hyperparameter value, four entry points, one refusal: the config dataclass raises
InvalidRequestError naming the field and the value, so the library and every command that
reads hyperparameters (``edit --hparams``, ``bench methods --hparams-dir`` / ``--sweep``,
``bench speed --hparams``) refuse it the same way: one ``rlsedit: error:`` line, exit code 3.

``--model`` names a folder that does not exist: a command that let the bad value through
would stop at loading the model (exit code 8), not run."""

from __future__ import annotations

import json

import pytest
from session_tiny import assert_one_line_error, cli, edit_records, write_jsonl

from rlsedit.editors.config import RLSEditConfig
from rlsedit.errors import InvalidRequestError

BAD = {"v_lr": -1.0}
NEEDLE = "v_lr must be a finite number > 0 or None, got -1.0"


@pytest.fixture
def files(tmp_path):
    edits = write_jsonl(tmp_path / "edits.jsonl", edit_records(2))
    hparams_dir = tmp_path / "hparams"
    hparams_dir.mkdir()
    (hparams_dir / "rlsedit.json").write_text(json.dumps(BAD))
    return {"edits": edits, "hparams": hparams_dir / "rlsedit.json", "dir": hparams_dir,
            "model": tmp_path / "no-model", "out": tmp_path / "out"}


def test_the_library_refuses_with_the_field_and_value():
    with pytest.raises(InvalidRequestError, match=NEEDLE):
        RLSEditConfig(**BAD)
    with pytest.raises(InvalidRequestError, match=NEEDLE):
        RLSEditConfig.from_dict(BAD)
    with pytest.raises(InvalidRequestError, match=NEEDLE):
        RLSEditConfig().replace(**BAD)


def test_edit_hparams_refuses_in_one_line(files):
    code, _, err = cli(["edit", "--state", str(files["out"]), "--edits", str(files["edits"]),
                        "--model", str(files["model"]), "--hparams", str(files["hparams"])])
    assert code == 3
    assert_one_line_error(code, err, NEEDLE, str(files["hparams"]))
    assert not files["out"].exists()


def test_bench_methods_hparams_dir_refuses_in_one_line(files):
    code, _, err = cli(["bench", "methods", "--data", str(files["edits"]), "--out", str(files["out"]),
                        "--model", str(files["model"]), "--methods", "rlsedit", "--hparams-dir", str(files["dir"])])
    assert code == 3
    assert_one_line_error(code, err, NEEDLE, str(files["hparams"]))
    assert not files["out"].exists()


def test_bench_methods_sweep_refuses_in_one_line(files):
    code, _, err = cli(["bench", "methods", "--data", str(files["edits"]), "--out", str(files["out"]),
                        "--model", str(files["model"]), "--methods", "rlsedit", "--sweep", "mu=-1"])
    assert code == 3
    assert_one_line_error(code, err, "mu_reg must be a finite number >= 0, got -1.0")
    assert not files["out"].exists()


def test_bench_speed_hparams_refuses_in_one_line(files):
    code, _, err = cli(["bench", "speed", "--data", str(files["edits"]), "--n", "2", "--reference-n", "1",
                        "--model", str(files["model"]),
                        "--hparams", str(files["hparams"])])
    assert code == 3
    assert_one_line_error(code, err, NEEDLE, str(files["hparams"]))


def test_edit_unknown_preset_refuses_in_one_line_before_loading(files):
    code, _, err = cli(["edit", "--state", str(files["out"]), "--edits", str(files["edits"]),
                        "--model", str(files["model"]), "--preset", "quick"])
    assert code == 3
    assert_one_line_error(code, err, "unknown preset 'quick'", "fast")
    assert not files["out"].exists()
