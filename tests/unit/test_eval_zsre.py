"""zsRE token-accuracy metrics on a tiny random model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from eval_tiny_lm import make_lm
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.scoring import score_continuations
from rlsedit.eval.zsre import DEFAULT_CONVENTION, evaluate_zsre, locality_predictions, zsre_requests
from rlsedit.requests import parse_request, target_text

RECORDS = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What will be the product of UniFirst?",
     "alt": "unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who plays the guitar in the band",
     "loc_ans": "Toko Yasuda"},
    {"subject": "Wellington", "src": "Which city is the twin of Wellington?", "rephrase": "Wellington is twinned with?",
     "alt": "Sheffield", "answers": ["Sydney"], "loc": "nq question: capital of France", "loc_ans": "Paris"},
]


@pytest.fixture(scope="module")
def lm():
    return make_lm(dtype=torch.float64, attn="sdpa")


def acc(lm, prompt, target):
    return score_continuations(lm, [prompt], [target_text(target)])[0].token_accuracy


def test_accuracies_match_direct_computation(lm):
    reqs = [parse_request(r, i) for i, r in enumerate(RECORDS)]
    out = evaluate_zsre(lm, reqs, convention="easyedit")
    assert out["convention"] == out["summary"]["convention"] == "easyedit"
    for rec, raw in zip(out["records"], RECORDS):
        assert rec["edit_acc"] == pytest.approx(acc(lm, raw["src"], raw["alt"]))
        assert rec["rephrase_acc"] == pytest.approx(acc(lm, raw["rephrase"], raw["alt"]))
        assert rec["locality_answer_acc"] == pytest.approx(acc(lm, raw["loc"], raw["loc_ans"]))
        assert "locality" not in rec
    assert out["summary"]["edit_acc"] == pytest.approx(sum(r["edit_acc"] for r in out["records"]) / 2)
    assert any("pre-edit" in n for n in out["notes"])
    json.dumps(out)


def test_locality_against_pre_edit_predictions(lm):
    reqs = [parse_request(r, i) for i, r in enumerate(RECORDS)]
    before = locality_predictions(lm, reqs)
    assert set(before) == {"0", "1"} and all(len(v) == 1 for v in before.values())
    json.loads(json.dumps(before))  # storable as JSON
    same = evaluate_zsre(lm, reqs, pre_edit_locality=before)
    assert same["summary"]["locality"] == 1.0  # nothing changed, every argmax agrees

    edited = copy.copy(lm)
    edited.model = copy.deepcopy(lm.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in edited.model.model.layers[1].mlp.parameters():
            p.add_(torch.randn_like(p) * 3.0)
    after = evaluate_zsre(edited, reqs, pre_edit_locality=before)
    post = locality_predictions(edited, reqs)
    for rec in after["records"]:
        pre_ids, post_ids = before[rec["id"]][0], post[rec["id"]][0]
        expected = sum(a == b for a, b in zip(pre_ids, post_ids)) / len(pre_ids)
        assert rec["locality"] == pytest.approx(expected)
    assert after["summary"]["locality"] < 1.0


def test_bad_pre_edit_predictions(lm):
    reqs = [parse_request(r, i) for i, r in enumerate(RECORDS)]
    good = locality_predictions(lm, reqs)
    with pytest.raises(EvalDataError, match="no entry"):
        evaluate_zsre(lm, reqs, pre_edit_locality={"0": good["0"]})
    with pytest.raises(EvalDataError, match="tokens"):
        evaluate_zsre(lm, reqs, pre_edit_locality={"0": good["0"], "1": [good["1"][0] + [1]]})
    with pytest.raises(EvalDataError, match="prompts"):
        evaluate_zsre(lm, reqs, pre_edit_locality={"0": good["0"] * 2, "1": good["1"]})
    with pytest.raises(EvalDataError, match="at least one"):
        evaluate_zsre(lm, [])


def test_memit_convention_is_the_default_and_edits_toward_answers_with_question_marks(lm):
    reqs = [parse_request(r, i) for i, r in enumerate(RECORDS)]
    assert DEFAULT_CONVENTION == "memit"
    out = evaluate_zsre(lm, reqs)
    assert out["convention"] == out["summary"]["convention"] == "memit"
    for rec, raw in zip(out["records"], RECORDS):
        assert rec["edit_acc"] == pytest.approx(acc(lm, raw["src"], raw["answers"][0]))
        assert rec["rephrase_acc"] == pytest.approx(acc(lm, raw["rephrase"], raw["answers"][0]))
        assert rec["locality_answer_acc"] == pytest.approx(acc(lm, raw["loc"] + "?", raw["loc_ans"]))
    edits = zsre_requests(reqs)
    assert [r.target_new for r in edits] == ["uniform", "Sydney"]
    assert edits[1].neighborhood == ("nq question: capital of France?",)
    assert zsre_requests(reqs, "easyedit") == reqs  # EasyEdit's: toward alt, prompts unchanged
    assert reqs[0].target_new == "unmanned aircraft"  # the input requests are not changed


def test_bad_conventions(lm):
    reqs = [parse_request(r, i) for i, r in enumerate(RECORDS)]
    with pytest.raises(EvalDataError, match="unknown zsRE convention"):
        evaluate_zsre(lm, reqs, convention="mend")
    no_answers = [parse_request({k: v for k, v in RECORDS[0].items() if k != "answers"}, 0)]
    with pytest.raises(EvalDataError, match="answers"):
        zsre_requests(no_answers, "memit")
    assert evaluate_zsre(lm, no_answers, convention="easyedit")["summary"]["requests"] == 1
