"""Issue 23's wiring on tiny random models: the zsRE convention reaches every zsRE result and
names itself; EasyEdit's locality (pre/post argmax agreement) is reported by ``run_eval`` and
``rlsedit eval``, from a state's own unedited weights W_0."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from eval_tiny_lm import make_lm
from locate_tiny import SENTENCES
from rlsedit import cli
from rlsedit.eval import zsre as zsre_module
from rlsedit.eval.counterfact import evaluate_counterfact, neighborhood_predictions
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.generation import GenerationConfig
from rlsedit.eval.pre_edit import pre_edit_locality, unedited_weights
from rlsedit.eval.runner import run_eval
from rlsedit.eval.zsre import (DEFAULT_CONVENTION, edited_convention, evaluate_zsre, is_mend_zsre_file,
                               locality_predictions, resolve_convention)
from rlsedit.requests import EditRequest, parse_request, read_requests
from test_bench_methods import EDITS, FAST, save_tiny_model

ZSRE = [
    {"subject": "The Eiffel Tower", "src": "Where is The Eiffel Tower located?", "rephrase": "The Eiffel Tower is in?",
     "alt": "Rome", "answers": ["Paris"], "loc": "nq question: the capital of France", "loc_ans": "Paris"},
    {"subject": "Toko Yasuda", "src": "Which instrument does Toko Yasuda play?",
     "rephrase": "Toko Yasuda plays which instrument?", "alt": "piano", "answers": ["guitar"],
     "loc": "nq question: who plays basketball in Chicago", "loc_ans": "Michael Jordan"},
]
COUNTERFACT = [
    EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", target_true="Paris",
                neighborhood=("The Louvre is located in", "Notre-Dame is in the city of")),
    EditRequest(id="b", prompt="{} plays", subject="Michael Jordan", target_new="baseball", target_true="basketball",
                neighborhood=("LeBron James plays",)),
]


def zsre_requests_raw() -> list[EditRequest]:
    return [parse_request(r, i) for i, r in enumerate(ZSRE)]


@pytest.fixture(scope="module")
def lm():
    return make_lm(dtype=torch.float64, attn="sdpa")


def perturbed(lm):
    """A copy of ``lm`` whose block-1 down projection is flipped and scaled: argmaxes move."""
    edited = copy.copy(lm)
    edited.model = copy.deepcopy(lm.model)
    edited.model.model.layers[1].mlp.down_proj.weight.data.mul_(-6.0)
    return edited


# ---- the convention ---------------------------------------------------------------------------

def applied(req: EditRequest, target: str) -> EditRequest:
    """``req`` as a state that edited it toward ``target`` journals it."""
    return dataclasses.replace(req, target_new=target)


def test_edited_convention_is_read_from_the_targets_the_state_wrote():
    reqs = zsre_requests_raw()
    assert edited_convention(reqs, {"0": applied(reqs[0], "Rome"), "1": applied(reqs[1], "piano")}) == "easyedit"
    assert edited_convention(reqs, {"0": applied(reqs[0], "Paris")}) == "memit"
    assert edited_convention(reqs, {"other": applied(reqs[0], "x")}) is None  # none of these records was edited
    # another file's record under the same id is not this record's edit
    assert edited_convention(reqs, {"0": COUNTERFACT[1]}) is None
    with pytest.raises(EvalDataError, match="mix conventions"):
        edited_convention(reqs, {"0": applied(reqs[0], "Rome"), "1": applied(reqs[1], "guitar")})
    with pytest.raises(EvalDataError, match="neither"):
        edited_convention(reqs, {"0": applied(reqs[0], "Berlin")})
    # a record whose alt is its answer tells nothing
    same = [parse_request(dict(ZSRE[0], alt="Paris"), 0)]
    assert edited_convention(same, {"0": same[0]}) is None


def test_resolve_convention_follows_the_state_and_refuses_the_other():
    reqs = zsre_requests_raw()
    toward_alt = {"0": applied(reqs[0], "Rome")}
    assert resolve_convention(None, reqs) == DEFAULT_CONVENTION == "memit"
    assert resolve_convention("easyedit", reqs) == "easyedit"
    assert resolve_convention(None, reqs, toward_alt) == "easyedit"
    assert resolve_convention("easyedit", reqs, toward_alt) == "easyedit"
    with pytest.raises(EvalDataError, match="toward alt .*'easyedit'.* never made"):
        resolve_convention("memit", reqs, toward_alt)
    with pytest.raises(EvalDataError, match="unknown zsRE convention"):
        resolve_convention("mend", reqs)


def test_memit_requests_have_no_old_object():
    memit = zsre_module.zsre_requests(zsre_requests_raw(), "memit")
    assert [r.target_new for r in memit] == ["Paris", "guitar"]
    assert all(r.target_true is None for r in memit)  # MEMIT's target_true is "<|endoftext|>"


def test_is_mend_zsre_file(tmp_path):
    zsre_file = tmp_path / "zsre.json"
    zsre_file.write_text(json.dumps(ZSRE))
    ours = tmp_path / "ours.jsonl"
    ours.write_text("\n".join(json.dumps(e) for e in EDITS))
    assert is_mend_zsre_file(zsre_file) and not is_mend_zsre_file(ours)


@pytest.mark.parametrize("convention", ["memit", "easyedit"])
def test_run_eval_passes_the_convention_to_zsre_and_its_generation(lm, monkeypatch, convention):
    from rlsedit.eval import runner

    seen = []
    real = runner.evaluate_zsre

    def spy(*args, **kwargs):
        seen.append(kwargs.get("convention"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_zsre", spy)
    reqs = zsre_requests_raw()
    out = run_eval(lm, zsre=reqs, zsre_convention=convention, details=True,
                   generation={"zsre": GenerationConfig(max_new_tokens=3, chat=False)})
    assert seen == [convention]
    assert out["zsre"]["convention"] == out["zsre"]["summary"]["convention"] == convention
    direct = evaluate_zsre(lm, reqs, convention=convention)
    assert out["zsre"]["summary"]["edit_acc"] == pytest.approx(direct["summary"]["edit_acc"])
    # the generation metrics ask for the convention's target and name the convention
    gen = out["generation"]["zsre"]
    assert gen["convention"] == convention
    expected = ["Paris", "guitar"] if convention == "memit" else ["Rome", "piano"]
    assert [r["target_new"] for r in gen["records"]] == expected
    prompts = [n["prompt"] for r in gen["records"] for n in r["neighbours"]]
    assert all(p.endswith("?") == (convention == "memit") for p in prompts)


# ---- EasyEdit locality ------------------------------------------------------------------------

def test_run_eval_reports_locality_per_suite_100_unedited_and_less_when_argmaxes_move(lm):
    zsre = zsre_requests_raw()
    before = pre_edit_locality(lm, counterfact=COUNTERFACT, zsre=zsre, zsre_convention="memit")
    assert set(before) == {"counterfact", "zsre"}
    assert before["counterfact"] == neighborhood_predictions(lm, COUNTERFACT)
    assert before["zsre"] == locality_predictions(lm, zsre, convention="memit")
    json.loads(json.dumps(before))  # storable

    same = run_eval(lm, counterfact=COUNTERFACT, zsre=zsre, pre_edit_locality=before)
    assert same["counterfact"]["summary"]["locality"] == 1.0
    assert same["zsre"]["summary"]["locality"] == 1.0
    # neighborhood accuracy against the answer stays its own, different number
    assert same["counterfact"]["summary"]["specificity_acc"] != 1.0

    edited = perturbed(lm)
    after = run_eval(edited, counterfact=COUNTERFACT, zsre=zsre, pre_edit_locality=before)
    assert after["counterfact"]["summary"]["locality"] < 1.0
    assert after["zsre"]["summary"]["locality"] < 1.0
    direct = evaluate_counterfact(edited, COUNTERFACT, pre_edit_locality=before["counterfact"])
    assert after["counterfact"]["summary"]["locality"] == pytest.approx(direct["summary"]["locality"])
    # without the reference no locality is claimed
    plain = run_eval(edited, counterfact=COUNTERFACT, zsre=zsre)
    assert "locality" not in plain["counterfact"]["summary"] and "locality" not in plain["zsre"]["summary"]


# ---- rlsedit eval on a state ------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("locality-wiring")
    model = save_tiny_model(root / "tiny-model")
    zsre_file = root / "zsre.json"
    zsre_file.write_text(json.dumps(ZSRE))
    cf_file = root / "edits.jsonl"
    cf_file.write_text("\n".join(json.dumps(e) for e in EDITS))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 4))
    hparams = root / "memit-seq.json"
    hparams.write_text(json.dumps(dict(FAST, mom2_n_samples=200)))
    return {"root": root, "model": model, "zsre": zsre_file, "cf": cf_file, "corpus": corpus, "hparams": hparams,
            "cache": root / "cache"}


def _eval(args, capsys) -> dict:
    assert cli.main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_unedited_weights_puts_w0_back_for_the_block_only(setup):
    from rlsedit.editors import MEMITSeqConfig
    from rlsedit.model.weights import get_W
    from rlsedit.session.session import Runtime, Session

    state = setup["root"] / "state-w0"
    runtime = Runtime(corpus=str(setup["corpus"]), cache_dir=str(setup["cache"]))
    with Session.create(state, model=str(setup["model"]), method="memit-seq",
                        config=MEMITSeqConfig(mom2_n_samples=200, **FAST), runtime=runtime) as session:
        session.edit(read_requests(setup["cf"])[:2], batch_size=2)
        layers = session.editor.layers
        edited = {l: get_W(session.lm, l) for l in layers}
        assert any(not torch.equal(edited[l], session.editor.W0[l]) for l in layers)
        with unedited_weights(session) as base:
            assert base is session.lm
            assert all(torch.equal(get_W(base, l), session.editor.W0[l]) for l in layers)
        assert all(torch.equal(get_W(session.lm, l), edited[l]) for l in layers)
        with pytest.raises(RuntimeError, match="inside"):
            with unedited_weights(session):
                raise RuntimeError("inside")
        assert all(torch.equal(get_W(session.lm, l), edited[l]) for l in layers)  # restored on an error too


def test_eval_state_follows_the_edits_convention_and_reports_locality(setup, capsys):
    from rlsedit.model.load import load_model

    state = setup["root"] / "state-zsre"
    # the real edit path: a MEND zsRE file is edited toward alt
    assert cli.main(["-q", "edit", "--state", str(state), "--edits", str(setup["zsre"]), "--model",
                     str(setup["model"]), "--method", "memit-seq", "--hparams", str(setup["hparams"]), "--corpus",
                     str(setup["corpus"]), "--cache-dir", str(setup["cache"]), "--batch-size", "2"]) == 0
    capsys.readouterr()
    common = ["--state", str(state), "--zsre-data", str(setup["zsre"]), "--suites", "zsre", "--no-generation",
              "--cache-dir", str(setup["cache"])]
    out = _eval(common, capsys)
    assert out["zsre"]["convention"] == out["zsre"]["summary"]["convention"] == "easyedit"
    assert 0.0 <= out["zsre"]["summary"]["locality"] <= 1.0
    # the same number from the base model loaded afresh and the state's edited model
    base = load_model(str(setup["model"]))
    reqs = read_requests(setup["zsre"])
    pre = locality_predictions(base, reqs, convention="easyedit")
    from rlsedit.session.session import Runtime, Session

    with Session.open(state, runtime=Runtime(cache_dir=str(setup["cache"])), read_only=True) as session:
        direct = evaluate_zsre(session.lm, reqs, pre_edit_locality=pre, convention="easyedit")
    assert out["zsre"]["summary"]["locality"] == pytest.approx(direct["summary"]["locality"])
    assert out["zsre"]["summary"]["edit_acc"] == pytest.approx(direct["summary"]["edit_acc"])

    # naming the other convention is refused, with the reason
    assert cli.main(["eval", *common, "--zsre-convention", "memit"]) == 3
    assert "toward alt" in capsys.readouterr().err
    # the printed form names the convention
    assert cli.main(["eval", *common]) == 0
    text = capsys.readouterr().out
    assert "zsre.convention: easyedit" in text and "zsre.locality:" in text


def test_eval_base_model_locality_is_100_and_default_convention_is_named(setup, capsys):
    out = _eval(["--model", str(setup["model"]), "--data", str(setup["cf"]), "--zsre-data", str(setup["zsre"]),
                 "--suites", "counterfact,zsre", "--no-generation"], capsys)
    assert out["counterfact"]["summary"]["locality"] == 1.0
    assert out["zsre"]["summary"]["locality"] == 1.0
    assert out["zsre"]["convention"] == DEFAULT_CONVENTION
    out = _eval(["--model", str(setup["model"]), "--zsre-data", str(setup["zsre"]), "--suites", "zsre",
                 "--zsre-convention", "easyedit", "--gen-max-new-tokens", "3", "--gen-chat", "no"], capsys)
    assert out["zsre"]["convention"] == out["generation"]["zsre"]["convention"] == "easyedit"


def test_edit_with_the_memit_convention_is_scored_under_it(setup, capsys):
    state = setup["root"] / "state-zsre-memit"
    edit = ["-q", "edit", "--state", str(state), "--model", str(setup["model"]), "--method", "memit-seq",
            "--hparams", str(setup["hparams"]), "--corpus", str(setup["corpus"]), "--cache-dir", str(setup["cache"]),
            "--batch-size", "2", "--zsre-convention", "memit"]
    assert cli.main([*edit, "--edits", str(setup["cf"])]) == 3  # not a zsRE file: refused, nothing made
    assert "does not hold MEND zsRE records" in capsys.readouterr().err and not state.exists()
    assert cli.main([*edit, "--edits", str(setup["zsre"])]) == 0
    capsys.readouterr()
    from rlsedit.session.session import Runtime, Session

    with Session.open(state, runtime=Runtime(cache_dir=str(setup["cache"])), read_only=True) as session:
        from rlsedit.eval.cli import journal_requests

        written = journal_requests(session)
    assert [r.target_new for r in written] == ["Paris", "guitar"]  # answers[0]
    assert all(p.endswith("?") for r in written for p in r.neighborhood)
    out = _eval(["--state", str(state), "--zsre-data", str(setup["zsre"]), "--suites", "zsre", "--no-generation",
                 "--cache-dir", str(setup["cache"])], capsys)
    assert out["zsre"]["convention"] == "memit"


def test_eval_state_generation_reference_comes_from_w0_as_from_the_base_model(setup, capsys):
    """eval --state decodes the neighbourhood before editing on the state's W_0 (no second model
    load): the neighbour-unchanged figure equals the one against the base model loaded afresh."""
    from rlsedit.eval.generation import GenerationConfig, evaluate_generation, pre_edit_generations
    from rlsedit.model.load import load_model
    from rlsedit.session.session import Runtime, Session

    state = setup["root"] / "state-gen-w0"
    assert cli.main(["-q", "edit", "--state", str(state), "--edits", str(setup["cf"]), "--model",
                     str(setup["model"]), "--method", "memit-seq", "--hparams", str(setup["hparams"]), "--corpus",
                     str(setup["corpus"]), "--cache-dir", str(setup["cache"]), "--batch-size", "2"]) == 0
    capsys.readouterr()
    out = _eval(["--state", str(state), "--data", str(setup["cf"]), "--gen-max-new-tokens", "4", "--gen-chat", "no",
                 "--cache-dir", str(setup["cache"])], capsys)
    reqs = read_requests(setup["cf"])
    cfg = GenerationConfig(max_new_tokens=4, chat=False)
    pre = pre_edit_generations(load_model(str(setup["model"])), reqs, cfg)
    with Session.open(state, runtime=Runtime(cache_dir=str(setup["cache"])), read_only=True) as session:
        direct = evaluate_generation(session.lm, reqs, cfg, pre_edit=pre)
    got = out["generation"]["counterfact"]["summary"]
    assert got["neighbour_unchanged"] is not None
    assert got["neighbour_unchanged"] == pytest.approx(direct["summary"]["neighbour_unchanged"])
    assert got["edit_begins"] == pytest.approx(direct["summary"]["edit_begins"])
