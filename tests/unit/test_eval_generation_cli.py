"""Generation metrics through ``rlsedit eval`` and :func:`run_eval` on a tiny random model (no
chat template), a base model and an edited state directory."""

from __future__ import annotations

import json

import pytest

from rlsedit import cli
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.generation import COLUMNS, GenerationConfig
from rlsedit.eval.runner import run_eval
from rlsedit.requests import read_requests
from test_bench_methods import FAST
from test_eval_cli import setup  # noqa: F401  (the tiny model, edits and corpus, as a fixture)


def _eval(args, capsys) -> dict:
    assert cli.main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_base_model_reports_generation_beside_teacher_forced(setup, capsys):
    out = _eval(["--model", str(setup["model"]), "--data", str(setup["data"]), "--gen-n", "3"], capsys)
    assert out["counterfact"]["summary"]["requests"] == 4  # teacher-forced on all, generation on the sample
    gen = out["generation"]["counterfact"]
    assert gen["counts"]["edits"] == 3 and gen["counts"]["edits_total"] == 4
    assert gen["summary"]["neighbour_unchanged"] == 1.0  # the unedited model against itself
    assert gen["summary"]["chat_mentions"] is None and gen["settings"]["chat"] is False  # no template
    assert "records" not in gen and 0 < len(gen["samples"]) <= 30
    assert gen["settings"]["paraphrase_kind"] == "paraphrase" and gen["settings"]["max_new_tokens"] == 12
    # the printed form lists every column and the sample rows
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", str(setup["data"]), "--n", "2"]) == 0
    text = capsys.readouterr().out
    for _, label in COLUMNS:
        assert f"  {label}: " in text
    assert "| kind | prompt | generation | target | verdict |" in text
    out = _eval(["--model", str(setup["model"]), "--data", str(setup["data"]), "--no-generation"], capsys)
    assert "generation" not in out


def test_chat_without_a_template_is_an_error(setup, capsys):
    # a library error: one line on stderr and a non-zero exit code (the code table is rlsedit.errors')
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", str(setup["data"]), "--gen-chat", "yes"]) != 0
    assert "no chat template" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", str(setup["data"]), "--gen-n", "0"]) != 0
    assert "--gen-n must be positive" in capsys.readouterr().err


def test_state_compares_neighbours_with_the_base_model(setup, capsys):
    from rlsedit.editors import RLSEditConfig
    from rlsedit.session.session import Runtime, Session

    state = setup["root"] / "state"
    runtime = Runtime(corpus=str(setup["corpus"]), cache_dir=str(setup["root"] / "cache"))
    with Session.create(state, model=str(setup["model"]), method="rlsedit",
                        config=RLSEditConfig(mom2_n_samples=200, **FAST), runtime=runtime) as s:
        s.edit(read_requests(setup["data"]), batch_size=4)
    out = _eval(["--state", str(state), "--data", str(setup["data"]), "--cache-dir", str(setup["root"] / "cache")],
                capsys)
    summary = out["generation"]["counterfact"]["summary"]
    assert summary["neighbour_unchanged"] is not None and 0.0 <= summary["neighbour_unchanged"] <= 1.0
    assert out["state"]["edits_applied"] == 4


def test_run_eval_takes_generation_per_edit_suite(setup):
    from rlsedit.model.load import load_model

    lm = load_model(str(setup["model"]), cache_dir=str(setup["root"] / "cache"))
    requests = read_requests(setup["data"])
    cfg = GenerationConfig(chat=False)
    out = run_eval(lm, counterfact=requests, generation={"counterfact": cfg}, details=True)
    assert len(out["generation"]["counterfact"]["records"]) == 4  # details keep the records
    with pytest.raises(EvalDataError, match="edit suites"):
        run_eval(lm, counterfact=requests, generation={"knowns": cfg})
