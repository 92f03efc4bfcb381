"""head_losses: per-row NLL and KL from the LM head with the gradient formed in the forward.

Checked against plain autograd through ``linear → (soft cap) → log_softmax`` in float64
(values and gradients to 1e-10), for chunks that split the NLL rows, end exactly at the first
KL row and hold only KL rows; against numerical differentiation (gradcheck); float32 against
float64; and on tiny models, batched targets with a soft-capped Gemma head against the
per-request reference, which reads the model's own logits.
"""

from __future__ import annotations

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import make_lm, requests
from rlsedit.locate import headloss
from rlsedit.locate.headloss import _HeadLoss, head_losses
from rlsedit.locate.targets import TargetConfig, compute_targets
from rlsedit.locate.targets_reference import compute_targets_reference

N, E, D, V = 9, 5, 6, 13  # rows, NLL rows (the rest are KL rows), head input width, vocabulary


def problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g, dtype=dtype)
    b = torch.randn(V, generator=g, dtype=dtype)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = torch.randint(V, (E,), generator=g)
    ref = torch.log_softmax(torch.randn(N - E, V, generator=g, dtype=dtype), dim=-1)
    weights = torch.randn(N, generator=g, dtype=dtype)  # a loss mixing every row
    return W, b, x, y, ref, weights


def autograd_values(x, W, b, cap, y, ref):
    logits = x @ W.T + b
    if cap:
        logits = cap * torch.tanh(logits / cap)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp[:E].gather(1, y.unsqueeze(1)).squeeze(1)
    q = logp[E:].detach() if ref is None else ref
    kl = (logp[E:].exp() * (logp[E:] - q)).sum(dim=-1)
    return torch.cat([nll, kl]), logp[E:].detach()


@pytest.mark.parametrize("cap", [None, 2.5])
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("rows_per_chunk", [2, 5, 6, N])  # splits NLL rows / ends at E / KL-only chunk / one chunk
def test_values_and_gradient_equal_autograd(monkeypatch, cap, with_ref, rows_per_chunk):
    monkeypatch.setattr(headloss, "CHUNK_ELEMENTS", rows_per_chunk * V)
    W, b, x, y, ref, weights = problem()
    ref = ref if with_ref else None
    x1 = x.clone().requires_grad_(True)
    values, kl_logp, top1 = _HeadLoss.apply(x1, W, b, cap, y, ref, True)
    (values * weights).sum().backward()
    x2 = x.clone().requires_grad_(True)
    expected, expected_logp = autograd_values(x2, W, b, cap, y, ref)
    (expected * weights).sum().backward()
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-12)
    if with_ref:
        assert kl_logp.shape == (0, V)  # the reference is taken once, not returned again
    else:
        torch.testing.assert_close(kl_logp, expected_logp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    assert x1.grad.abs().max() > 1e-3  # the rows do carry a gradient
    logits = x @ W.T + b
    assert torch.equal(top1, logits[:E].argmax(dim=-1) == y)  # the cap is monotone: same argmax
    if not with_ref:
        assert (values[E:] == 0).all()  # against its own distribution: zero KL


def test_top1_counts_a_tied_maximum_and_nothing_below_it():
    W, b, x, y, ref, _ = problem()
    logits = x[:E] @ W.T + b
    y = logits.argmax(dim=-1)
    y[1] = logits[1].argsort()[-2]            # the second most probable token: not top-1
    W2, b2 = torch.cat([W, W[y[0]].unsqueeze(0)]), torch.cat([b, b[y[0]].unsqueeze(0)])
    y[0] = V                                  # a copy of row 0's argmax token: a tie, still top-1
    _, _, top1 = _HeadLoss.apply(x, W2, b2, None, y, ref.new_zeros(N - E, V + 1), False)
    assert top1.tolist() == [True, False, True, True, True]


@pytest.mark.parametrize("cap", [None, 2.5])
def test_gradient_matches_finite_differences(cap):
    W, b, x, y, ref, _ = problem()
    x = x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _HeadLoss.apply(x, W, b, cap, y, ref, True)[0], (x,))


def test_float32_within_bound_of_float64():
    W, b, x, y, ref, weights = problem()
    grads, values = [], []
    for dtype in (torch.float32, torch.float64):
        xi = x.to(dtype).requires_grad_(True)
        v, _, _ = _HeadLoss.apply(xi, W.to(dtype), b.to(dtype), 2.5, y, ref.to(dtype), True)
        (v * weights.to(dtype)).sum().backward()
        values.append(v.double())
        grads.append(xi.grad.double())
    assert ((values[0] - values[1]).abs().max() / values[1].abs().max()).item() < 1e-5
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-5


def test_without_grad_mode_nothing_is_kept_for_a_backward():
    lm = make_lm("llama")
    hidden = torch.randn(4, lm.d_model, requires_grad=True)
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        values, logp, _ = head_losses(lm, hidden, y, None)
    assert not values.requires_grad and values.grad_fn is None
    with_grad, _, _ = head_losses(lm, hidden, y, None)
    torch.testing.assert_close(values, with_grad.detach())
    assert logp.shape == (1, lm.model.get_output_embeddings().weight.shape[0])  # the one KL row


def test_soft_capped_head_batched_equals_reference():
    # Gemma 3 270M does not cap its logits; Gemma 2 style configurations do. The reference
    # reads the capped logits from the model's own forward.
    lm = make_lm("gemma3_text")
    lm.model.config.final_logit_softcapping = 0.5  # small enough that tanh bends every logit
    config = TargetConfig(lr=0.5, steps=6, early_stop_loss=0.0, early_stop_nll=0.0, clamp_norm_factor=4.0)
    prefixes = ["{}", "The city is far away. {}"]
    batched = compute_targets(lm, 2, requests(), prefixes, config)
    reference = compute_targets_reference(lm, 2, requests(), prefixes, config)
    err = ((batched.z - reference.z).norm(dim=-1) / reference.z.norm(dim=-1)).max().item()
    assert err < 1e-4, err
    torch.testing.assert_close(batched.losses, reference.losses, rtol=1e-4, atol=1e-4)
    lm.model.config.final_logit_softcapping = None
    uncapped = compute_targets(lm, 2, requests(), prefixes, config)
    assert not torch.allclose(uncapped.losses, batched.losses, rtol=1e-3)  # the cap took effect


def test_head_must_be_linear():
    lm = make_lm("llama")
    lm.model.lm_head = torch.nn.Sequential(lm.model.lm_head)
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        head_losses(lm, torch.zeros(2, lm.d_model), torch.tensor([1]), None)
