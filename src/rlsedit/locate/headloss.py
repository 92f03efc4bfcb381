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


def _shifted_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cap: float | None):
    """``(ℓ − max_v ℓ per row, tanh(z/c) or None)`` for head inputs ``x (r, d)``, in float32 at
    least (bfloat16 weights give float32 losses; float64 stays float64). One ``(r × vocab)``
    tensor without a soft cap, two with one (``tanh`` is kept for ``∂ℓ/∂z``)."""
    z = torch.nn.functional.linear(x, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    squash = None
    if cap:
        squash = z.div_(cap).tanh_()                   # ℓ = c·tanh(z/c)
        z = squash * cap
    return z.sub_(z.amax(dim=-1, keepdim=True)), squash


class _HeadLoss(torch.autograd.Function):
    """``x (n, d) → L (n,)``: rows ``0..e-1`` NLL of ``tgt_id``, rows ``e..n-1`` KL against
    ``kl_ref`` (log-probs ``(n − e, V)``; ``None``: against this forward's own distribution,
    so those values and their gradients are zero, and the KL rows' log-probs are returned to
    become the reference; otherwise the second output is empty). The third output, ``(e,)``
    bool, says whether each NLL row's target is the most probable token (``s_y = 0``: the
    shifted logits are ``ℓ − max ℓ``, so the maximum is exactly zero)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cap, tgt_id, kl_ref, with_grad):
        n, e = x.shape[0], tgt_id.numel()
        dtype = torch.promote_types(weight.dtype, torch.float32)
        values = torch.empty(n, dtype=dtype, device=x.device)
        kl_logp = torch.empty((n - e if kl_ref is None else 0, weight.shape[0]), dtype=dtype, device=x.device)
        top1 = torch.empty(e, dtype=torch.bool, device=x.device)
        grad_x = torch.empty_like(x) if with_grad else None
        step = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for a in range(0, n, step):
            b = min(n, a + step)
            nll = slice(0, max(0, min(b, e) - a))    # this chunk's NLL rows, chunk-local
            kl = slice(nll.stop, b - a)              # and its KL rows (global rows e.. come last)
            ref = slice(a + kl.start - e, b - e)     # the same KL rows among all n − e of them
            # log p = s − log Σ_v exp(s_v) with s = ℓ − max ℓ (log_softmax's own arithmetic),
            # computed in place over one (rows × vocab) tensor: what the losses read of s is
            # taken out first, then s becomes exp(s), then p
            shifted, squash = _shifted_logits(x[a:b], weight, bias, cap)
            y = tgt_id[a:a + nll.stop]
            picked = shifted[nll].gather(1, y.unsqueeze(1)).squeeze(1)  # s_y
            top1[a:a + nll.stop] = picked >= 0                          # y is an argmax
            log_p_kl = shifted[kl].clone()                             # (k, V)
            p = shifted.exp_()                                         # `shifted` is spent
            total = p.sum(dim=-1, keepdim=True)
            log_total = total.log()
            p.div_(total)
            values[a:a + nll.stop] = log_total[nll, 0] - picked         # NLL: −log p_y
            log_p_kl.sub_(log_total[kl])
            if kl_ref is None:
                kl_logp[ref] = log_p_kl
                values[a + kl.start:b] = 0.0
                p[kl] = 0.0                                            # no gradient either
            elif kl.stop > kl.start:
                log_ratio = log_p_kl.sub_(kl_ref[ref])                 # log p − log q, in place
                # KL: L = Σ_v p_v (log p_v − log q_v), a row-wise dot product (no (k × V) temporary)
                divergence = (p[kl].unsqueeze(1) @ log_ratio.unsqueeze(2)).view(-1)
                values[a + kl.start:b] = divergence
                if with_grad:                                          # ∂L/∂ℓ = p (log p − log q − L)
                    p[kl].mul_(log_ratio.sub_(divergence.unsqueeze(1)))
            if not with_grad:
                continue
            grad = p.index_put_((torch.arange(nll.stop, device=x.device), y),
                                torch.tensor(-1.0, dtype=p.dtype, device=p.device),
                                accumulate=True)                       # NLL rows: p − onehot(y)
            if squash is not None:
                grad.mul_(squash.square_().neg_().add_(1))             # ∂ℓ/∂z = 1 − tanh²(z/c)
            grad_x[a:b] = (grad.to(weight.dtype) @ weight).to(x.dtype)
        ctx.save_for_backward(grad_x if with_grad else None)
        ctx.mark_non_differentiable(kl_logp, top1)
        return values, kl_logp, top1

    @staticmethod
    def backward(ctx, grad_values, _grad_kl_logp, _grad_top1):
        (grad_x,) = ctx.saved_tensors
        if grad_x is None:
            raise RuntimeError("head_losses was run with with_grad=False; it has no gradient")
        return grad_x * grad_values.to(grad_x.dtype).unsqueeze(1), None, None, None, None, None, None


def head_losses(lm, hidden: torch.Tensor, tgt_id: torch.Tensor,
                kl_ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses from final-block states ``hidden (n, d_model)``.

    Rows ``0..e-1`` (``e = tgt_id.numel()``) give ``−log p(tgt_id[i])``; rows ``e..n-1``
    give ``KL(p ‖ q)`` against ``kl_ref`` (``(n − e, vocab)`` log-probs of the unedited
    model), or zero when ``kl_ref`` is ``None`` (the first step, when the reference is being
    taken). Returns ``(values (n,), kl_log_probs)``: the KL rows' log-probs ``(n − e, vocab)``,
    detached, when ``kl_ref`` is ``None``, else an empty ``(0, vocab)`` tensor (the reference
    is taken once; later steps would only pay for the copy).
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
