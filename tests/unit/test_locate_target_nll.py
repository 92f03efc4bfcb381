"""FT-L's objective (locate/target_nll.py): each request's mean target-token NLL, then the mean
over requests, equal in value and gradient to the same loss read from the full model's logits,
though it runs only the blocks from the lowest edited layer and the head only at target positions."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import make_lm
from rlsedit.locate.target_nll import TargetNLL, _nll_batch
from rlsedit.model.weights import down_proj
from rlsedit.requests import EditRequest

# targets of different token lengths, prompts of different lengths: right padding is exercised
REQUESTS = [
    EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
    EditRequest(id="b", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="French and English"),
    EditRequest(id="c", prompt="{} plays the", subject="Toko Yasuda", target_new="electric guitar"),
]


def full_logits_loss(lm, requests) -> torch.Tensor:
    """The loss written out from the whole model's logits: per request the mean over its target
    tokens of −log p(y_t | everything before it), then the mean over requests."""
    ids, attention, target_mask = _nll_batch(lm, requests)
    logp = torch.log_softmax(lm.model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
    per_request = []
    for i in range(len(requests)):
        positions = torch.nonzero(target_mask[i]).flatten()  # each target token's own position
        assert positions.numel() >= 1 and bool((positions > 0).all())
        per_request.append(torch.stack([-logp[i, t - 1, ids[i, t]] for t in positions]).mean())
    return torch.stack(per_request).mean()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_value_and_gradient_equal_the_full_logits_loss(family):
    torch.manual_seed(0)
    lm = make_lm(family)
    layers = (1, 2)
    _, _, target_mask = _nll_batch(lm, REQUESTS)
    counts = target_mask.sum(dim=1).tolist()
    assert len(set(counts)) > 1  # the per-request mean differs from the mean over all tokens
    params = [down_proj(lm, l).weight for l in layers]
    for p in params:
        p.requires_grad_(True)
    try:
        expected = full_logits_loss(lm, REQUESTS)
        expected_grads = torch.autograd.grad(expected, params)
        got = TargetNLL(lm, REQUESTS, min(layers))()
        got_grads = torch.autograd.grad(got, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    for g, e in zip(got_grads, expected_grads):
        assert float(e.norm()) > 0
        assert float((g - e).norm()) <= 1e-4 * float(e.norm())


def test_it_reads_the_weights_as_they_are_at_each_call():
    lm = make_lm("llama")
    loss = TargetNLL(lm, REQUESTS, 2)
    before = float(loss())
    with torch.no_grad():
        down_proj(lm, 3).weight.mul_(1.5)  # above `first`: the next call must see it
    after = float(loss())
    assert after != pytest.approx(before, rel=1e-6)
    assert after == pytest.approx(float(full_logits_loss(lm, REQUESTS)), rel=1e-5)
