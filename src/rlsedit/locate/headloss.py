"""The target objective's per-row losses, read from the LM head without keeping the logits.

:func:`head_losses` maps final-block states at the positions a loss reads to one number per
row: the NLL of a target token, or the KL term's divergence from the unedited distribution.
Plain autograd would keep several ``(rows × vocab)`` float32 tensors alive from the forward
to the backward (logits, soft-capped logits, log-probabilities, their gradients) — on Gemma
3's 262,144-token vocabulary ~60 MB each for one group of rows, at the moment every block's
activations are also alive. Here the gradient with respect to the head's input is formed
during the forward, a chunk of rows at a time, and only that ``(rows × d_model)`` gradient
is kept; the backward scales it by the incoming gradient. Each row feeds exactly one output
value, so that scaling is the whole chain rule.

With ``z = head(x)``, logits ``ℓ = c·tanh(z/c)`` (soft-capped logits, e.g. Gemma 2) or ``ℓ = z``,
``log p = log_softmax(ℓ)`` and ``p = exp(log p)``:

    NLL row (target y):   L = −log p_y                     ∂L/∂ℓ = p − onehot(y)
    KL row (against q):   L = Σ_v p_v (log p_v − log q_v)   ∂L/∂ℓ_v = p_v (log p_v − log q_v − L)
    soft cap:             ∂ℓ/∂z = 1 − (ℓ/c)²
    head (z = x Wᵀ + b):  ∂L/∂x = (∂L/∂z) W
"""

from __future__ import annotations

import torch

from ..model.arch import resolve

CHUNK_ELEMENTS = 1 << 24
"""Rows per chunk are chosen so that one ``(rows × vocab)`` float32 tensor holds about this
many elements (64 MiB): 341 rows on SmolLM2's 49,152-token vocabulary, 64 on Gemma 3's 262,144,
so a default target group (≤ 32 rows, ~50 loss rows) is one chunk. Each chunk reads the whole
head weight twice (forward and gradient); on Gemma (671 MB of head weight) 16-row chunks were
~25% slower per batch of targets (47 s against 37 s, 20 CounterFact edits, 2 threads) for
~40 MB less peak memory."""


def _log_probs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cap: float | None):
    """``(log p, tanh(z/c) or None)`` for head inputs ``x (r, d)``, in float32 at least
    (bfloat16 weights give float32 losses; float64 stays float64). Written in place where it
    can be: at most three ``(r × vocab)`` tensors are alive at once."""
    z = torch.nn.functional.linear(x, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if not cap:
        return torch.log_softmax(z, dim=-1), None
    squash = z.div_(cap).tanh_()                   # ℓ = c·tanh(z/c); tanh kept for ∂ℓ/∂z
    return torch.log_softmax(squash * cap, dim=-1), squash


class _HeadLoss(torch.autograd.Function):
    """``x (n, d) → L (n,)``: rows ``0..e-1`` NLL of ``tgt_id``, rows ``e..n-1`` KL against
    ``kl_ref`` (log-probs ``(n − e, V)``; ``None``: against this forward's own distribution,
    so those values and their gradients are zero). Also returns the KL rows' log-probs."""

    @staticmethod
    def forward(ctx, x, weight, bias, cap, tgt_id, kl_ref, with_grad):
        n, e = x.shape[0], tgt_id.numel()
        dtype = torch.promote_types(weight.dtype, torch.float32)
        values = torch.empty(n, dtype=dtype, device=x.device)
        kl_logp = torch.empty((n - e, weight.shape[0]), dtype=dtype, device=x.device)
        grad_x = torch.empty_like(x) if with_grad else None
        step = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for a in range(0, n, step):
            b = min(n, a + step)
            logp, squash = _log_probs(x[a:b], weight, bias, cap)
            t = torch.arange(a, max(a, min(b, e)), device=x.device)  # NLL rows of this chunk
            k = torch.arange(max(a, e), max(b, e), device=x.device)  # KL rows of this chunk
            y = tgt_id[t]
            values[t] = -logp[t - a, y]
            kl = None
            if k.numel():
                rows = logp[k - a]                                    # (k, V), a copy
                kl_logp[k - e] = rows
                if kl_ref is None:
                    values[k] = 0.0
                else:
                    log_ratio = rows - kl_ref[k - e]
                    kl = (rows.exp() * log_ratio).sum(dim=-1)
                    values[k] = kl
            if not with_grad:
                continue
            grad = logp.exp_()                                        # p; logp is spent
            grad.index_put_((t - a, y), torch.tensor(-1.0, dtype=grad.dtype, device=grad.device),
                            accumulate=True)                          # NLL rows: p − onehot(y)
            if k.numel():                                             # KL rows: p (log p − log q − L)
                grad[k - a] = 0.0 if kl is None else grad[k - a] * (log_ratio - kl.unsqueeze(1))
            if squash is not None:
                grad.mul_(squash.square_().neg_().add_(1))            # ∂ℓ/∂z = 1 − tanh²(z/c)
            grad_x[a:b] = (grad.to(weight.dtype) @ weight).to(x.dtype)
        ctx.save_for_backward(grad_x if with_grad else None)
        ctx.mark_non_differentiable(kl_logp)
        return values, kl_logp

    @staticmethod
    def backward(ctx, grad_values, _grad_kl_logp):
        (grad_x,) = ctx.saved_tensors
        if grad_x is None:
            raise RuntimeError("head_losses was run with with_grad=False; it has no gradient")
        return grad_x * grad_values.to(grad_x.dtype).unsqueeze(1), None, None, None, None, None, None


def head_losses(lm, hidden: torch.Tensor, tgt_id: torch.Tensor,
                kl_ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses from final-block states ``hidden (n, d_model)``.

    Rows ``0..e-1`` (``e = tgt_id.numel()``) give ``−log p(tgt_id[i])``; rows ``e..n-1``
    give ``KL(p ‖ q)`` against ``kl_ref`` (``(n − e, vocab)`` log-probs of the unedited
    model), or zero when ``kl_ref`` is ``None`` (the first step, when the reference is being
    taken). Returns ``(values (n,), kl_log_probs (n − e, vocab))``, the latter detached.
    Gradients flow to ``hidden`` (through the final norm) when grad mode is on.
    """
    norm = resolve(lm.model, lm.arch.final_norm)
    head = resolve(lm.model, lm.arch.lm_head)
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the LM head must be a torch.nn.Linear, got {type(head).__name__}")
    x = norm(hidden)
    with_grad = torch.is_grad_enabled() and x.requires_grad
    return _HeadLoss.apply(x, head.weight.detach(), None if head.bias is None else head.bias.detach(),
                           float(cap) if cap else None, tgt_id, kl_ref, with_grad)
