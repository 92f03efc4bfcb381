"""FT-L (issue 23, point 5): pads with the project's rule (tokenizers without a pad token) and
stops at ft_main's 1e-2 (its loss: test_locate_target_nll.py)."""

from __future__ import annotations

import pytest
import torch

import rlsedit.editors.ft as ft
from locate_tiny import make_lm
from rlsedit.editors import FT
from rlsedit.editors.config import FTConfig
from rlsedit.model.weights import get_W
from rlsedit.requests import EditRequest

REQUESTS = [
    EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
    EditRequest(id="b", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="French and English"),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ft_runs_with_a_tokenizer_without_a_pad_token(family):
    lm = make_lm(family)
    lm.tokenizer.pad_token = None  # GPT-2's and Llama 3's tokenizers have none
    assert lm.tokenizer.pad_token_id is None
    W0 = get_W(lm, 2)
    editor = FT(lm, FTConfig(layers=(2,), num_steps=2))
    record = editor.propose(REQUESTS).commit()  # rows of different lengths need padding
    assert not torch.equal(get_W(lm, 2), W0) and torch.isfinite(record.tensors["layers.2.W"]).all()


def test_no_step_is_taken_once_the_loss_is_below_the_early_stop(monkeypatch):
    lm = make_lm("llama")
    W0 = get_W(lm, 2)
    monkeypatch.setattr(ft, "EARLY_STOP_LOSS", 1e9)  # every loss is "below 1e-2" now
    record = FT(lm, FTConfig(layers=(2,), num_steps=3)).propose(REQUESTS[:1]).commit()
    assert torch.equal(get_W(lm, 2), W0) and record.info["final_loss"] > 0
