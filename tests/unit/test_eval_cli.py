"""``rlsedit eval`` on a tiny random model: a base model and an edited state directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from locate_tiny import SENTENCES
from rlsedit import cli
from rlsedit.eval.cli import split_suites
from rlsedit.errors import InvalidRequestError
from test_bench_methods import EDITS, FAST, save_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalcli")
    model = save_tiny_model(root / "tiny-model")
    data = root / "edits.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EDITS))
    data_dir = root / "data"
    (data_dir / "corpus").mkdir(parents=True)
    (data_dir / "corpus" / "wikitext2_test.txt").write_text(" ".join(SENTENCES * 3))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 4))
    return {"root": root, "model": model, "data": data, "data_dir": data_dir, "corpus": corpus}


def _eval(args, capsys) -> dict:
    assert cli.main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_split_suites():
    assert split_suites(("counterfact", "ppl", "retention", "glue")) == (
        ("counterfact", "retention"), ("wikitext", "sst2", "mrpc", "cola", "rte", "nli", "sentiment_analysis",
                                       "dialogue"))
    with pytest.raises(InvalidRequestError):
        split_suites(("counterfact", "bogus"))


def test_base_model_counterfact_and_perplexity(setup, capsys):
    out = _eval(["--model", str(setup["model"]), "--data", str(setup["data"]), "--n", "3",
                 "--suites", "counterfact,ppl", "--data-dir", str(setup["data_dir"]), "--ppl-tokens", "50"], capsys)
    summary = out["counterfact"]["summary"]
    assert summary["requests"] == 3
    assert 0.0 <= summary["efficacy"] <= 1.0 and out["counterfact"]["chance"]["efficacy"] == 0.5
    ppl = out["general"]["wikitext"]
    assert ppl["ppl"] > 1 and ppl["chance"] > 1
    assert out["state"]["edits_applied"] == 0
    # the human-readable form prints each figure with its chance level
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", str(setup["data"]), "--n", "2"]) == 0
    text = capsys.readouterr().out
    assert "counterfact.efficacy:" in text and "(chance 0.5)" in text


def test_state_retention_follows_the_journal_and_leaves_the_state_alone(setup, capsys):
    from rlsedit.editors import RLSEditConfig
    from rlsedit.requests import read_requests
    from rlsedit.session.session import Runtime, Session

    state = setup["root"] / "state"
    runtime = Runtime(corpus=str(setup["corpus"]), cache_dir=str(setup["root"] / "cache"))
    config = RLSEditConfig(mom2_n_samples=200, **FAST)
    with Session.create(state, model=str(setup["model"]), method="rlsedit", config=config, runtime=runtime) as s:
        s.edit(read_requests(setup["data"])[:3], batch_size=2)

    def digest() -> str:
        h = hashlib.sha256()
        for path in sorted(state.rglob("*")):
            if path.is_file() and path.name != "lock":
                h.update(path.name.encode() + path.read_bytes())
        return h.hexdigest()

    before = digest()
    out = _eval(["--state", str(state), "--data", str(setup["data"]), "--n", "3", "--suites",
                 "counterfact,retention", "--retention-bins", "3", "--cache-dir", str(setup["root"] / "cache")], capsys)
    assert digest() == before
    assert out["state"]["method"] == "rlsedit" and out["state"]["edits_applied"] == 3
    assert out["retention"]["edits"] == 3
    assert [b["count"] for b in out["retention"]["bins"]["success"]] == [1, 1, 1]


def test_bad_requests_are_refused(setup, capsys):
    assert cli.main(["eval", "--model", str(setup["model"]), "--suites", "retention", "--data",
                     str(setup["data"])]) == 3  # invalid input
    assert "needs --state" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(setup["model"]), "--suites", "counterfact"]) == 3  # invalid input
    assert "needs --data" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(setup["model"]), "--suites", "hellaswag"]) == 3  # invalid input
    assert "unknown general suite" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", str(setup["data"]), "--n", "0"]) == 3  # invalid input
    assert "--n must be positive" in capsys.readouterr().err


def test_progress_bar_over_the_suites_unless_quiet(setup, capsys):
    args = ["eval", "--model", str(setup["model"]), "--data", str(setup["data"]), "--suites", "counterfact,ppl",
            "--data-dir", str(setup["data_dir"]), "--ppl-tokens", "50", "--no-generation", "--json", "--progress"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "evaluating" in err and "2/2" in err
    assert cli.main(["-q", *args]) == 0
    assert "evaluating" not in capsys.readouterr().err
