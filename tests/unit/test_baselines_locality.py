"""CounterFact's EasyEdit locality (issue 23, labels): pre/post agreement of the teacher-forced
argmaxes on the neighbourhood answer, distinct from neighborhood_acc (accuracy against it)."""

from __future__ import annotations

import copy

import pytest
import torch

from eval_tiny_lm import make_lm
from rlsedit.eval.counterfact import evaluate_counterfact, neighborhood_predictions
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.scoring import score_continuations
from rlsedit.requests import EditRequest, target_text

REQUESTS = [
    EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", target_true="Paris",
                neighborhood=("The Louvre is located in", "Notre-Dame is in the city of")),
    EditRequest(id="b", prompt="{} plays", subject="Michael Jordan", target_new="baseball", target_true="basketball",
                neighborhood=("LeBron James plays",)),
]


@pytest.fixture(scope="module")
def lm():
    return make_lm(dtype=torch.float64, attn="sdpa")


def test_locality_is_pre_post_agreement_not_answer_accuracy(lm):
    before = neighborhood_predictions(lm, REQUESTS)
    assert {k: len(v) for k, v in before.items()} == {"a": 2, "b": 1}
    same = evaluate_counterfact(lm, REQUESTS, pre_edit_locality=before)
    assert same["summary"]["locality"] == 1.0  # nothing changed: every argmax agrees
    assert same["summary"]["specificity_acc"] < 1.0  # while the answer accuracy is another number
    assert "locality" not in evaluate_counterfact(lm, REQUESTS)["summary"]

    edited = copy.copy(lm)
    edited.model = copy.deepcopy(lm.model)
    with torch.no_grad():  # a large change in one MLP: some argmaxes move
        edited.model.model.layers[1].mlp.down_proj.weight.mul_(-6.0)
    out = evaluate_counterfact(edited, REQUESTS, pre_edit_locality=before)
    for req, rec in zip(REQUESTS, out["records"]):
        shares = []
        for prompt, pre in zip(req.neighborhood, before[req.id]):
            post = score_continuations(edited, [prompt], [target_text(req.target_true)])[0].argmax_ids
            shares.append(sum(a == b for a, b in zip(pre, post)) / len(pre))
        assert rec["locality"] == pytest.approx(sum(shares) / len(shares))
    assert out["summary"]["locality"] < 1.0
    with pytest.raises(EvalDataError, match="pre_edit_locality"):
        evaluate_counterfact(lm, REQUESTS, pre_edit_locality={"a": before["a"]})
