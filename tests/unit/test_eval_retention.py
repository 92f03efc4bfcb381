"""Forgetting-curve binning and per-position efficacy."""

from __future__ import annotations

import pytest
import torch

from eval_tiny_lm import make_lm
from rlsedit.eval.counterfact import score_requests
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.retention import bin_by_position, forgetting_curve
from rlsedit.requests import EditRequest


def test_bins_are_contiguous_and_balanced():
    bins = bin_by_position([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0], 3)
    assert [(b["first"], b["last"], b["count"]) for b in bins] == [(0, 2, 3), (3, 4, 2), (5, 6, 2)]
    assert [b["mean"] for b in bins] == pytest.approx([2 / 3, 0.5, 0.5])


def test_bins_skip_none_and_cap_bin_count():
    bins = bin_by_position([None, 1.0], 5)
    assert len(bins) == 2
    assert bins[0] == {"first": 0, "last": 0, "count": 0, "mean": None}
    assert bins[1]["mean"] == 1.0
    assert bin_by_position([], 4) == []
    with pytest.raises(EvalDataError):
        bin_by_position([1.0], 0)


def test_forgetting_curve_per_edit_is_rewrite_efficacy():
    lm = make_lm(dtype=torch.float64, attn="sdpa")
    reqs = [
        EditRequest(id=f"e{i}", prompt="{} plays the", subject=s, target_new=new, target_true=old)
        for i, (s, new, old) in enumerate([("Toko Yasuda", "piano", "guitar"), ("John Lennon", "guitar", "piano"),
                                           ("Danielle", "French", "English"), ("Wellington", "Sheffield", "Sydney")])
    ]
    curve = forgetting_curve(lm, reqs, n_bins=2)
    direct = score_requests(lm, reqs, groups=("rewrite",))
    assert [e["position"] for e in curve["per_edit"]] == [0, 1, 2, 3]
    assert [e["success"] for e in curve["per_edit"]] == [d["rewrite_success"] for d in direct]
    assert [e["acc"] for e in curve["per_edit"]] == [d["rewrite_acc"] for d in direct]
    first = curve["bins"]["success"][0]
    assert first["mean"] == pytest.approx((direct[0]["rewrite_success"] + direct[1]["rewrite_success"]) / 2)
    assert curve["chance"]["success"] == 0.5
    with pytest.raises(EvalDataError):
        forgetting_curve(lm, [])
    # all groups' records of a checkpoint give the same curve without scoring again
    full = score_requests(lm, reqs)
    assert forgetting_curve(lm, reqs, n_bins=2, records=full) == curve
    with pytest.raises(EvalDataError, match="not those of the requests"):
        forgetting_curve(lm, reqs, n_bins=2, records=full[::-1])
