"""Fast value targets: ``δ`` from one gradient at ``δ = 0`` and a line search along it, with
Adam only where that falls short.

The Adam loop of :func:`~rlsedit.locate.targets.compute_targets` spends ~15 forward and
backward passes through the blocks above the edited layer per batch (benchmarks/SPEED.md).
Here, on the same prepared rows and the same objective ``L_i(δ)`` (targets.py's module doc):

1. **Gradient.** One forward/backward at ``δ = 0`` gives ``g_i = ∇_δ L_i(0)``, Adam's step-0
   gradient. At ``δ = 0`` the KL term sits at its minimum (value and gradient zero) and
   ``‖δ‖`` takes torch's zero subgradient, so ``g_i`` is the gradient of the mean target NLL
   ``(1/P) Σ_p (1/T) Σ_t −log P(y_t | …)`` alone. The same pass takes the KL reference.
2. **Line search.** The candidates ``δ_ik = −s_k ‖h_i‖ g_i / ‖g_i‖`` (``s_k`` from
   ``TargetConfig.step_sizes``, capped at ``clamp_norm_factor``: the ball Adam is held to)
   run in one pass without autograd, as extra rows beside each other.
3. **Choice.** Request ``i`` takes the smallest ``s_k`` whose mean target NLL is below
   ``accept_nll`` (the loop too stops at the first step meeting its bar rather than pushing
   ``δ`` further); where no candidate reaches it, the candidate — or ``δ = 0`` — of least
   ``L_i``.

``method="onestep"`` returns that. ``method="verify"`` then runs the Adam loop, from the
line search's ``δ``, for the requests it left at or above ``accept_nll``; the loop stops by
its own rule with the NLL bar raised to ``max(early_stop_nll, accept_nll)`` and each request
keeps the lowest-loss ``δ`` it was evaluated at, so none ends worse (by the loop's own
evaluation of ``L_i``) than its cheap start.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .target_config import TARGET_BATCH_SIZE, TargetConfig
from .targets import (TargetResult, _adam, _groups, _initial_states, _replay, _run_prepared,
                      _size, compute_targets)

CANDIDATE_ROWS = 128
"""Most rows per line-search forward (a group's rows times the candidates riding together).
No autograd state is kept, so memory is one forward's activations: ~50 MB at SmolLM2's widths
and ~30 tokens per row."""


def compute_value_targets(lm, layer: int, requests, prefixes, config: TargetConfig | None = None, *,
                          batch_size: int = TARGET_BATCH_SIZE,
                          paraphrases: list[list[str]] | None = None) -> TargetResult:
    """Targets by ``config.method``: ``"adam"`` is :func:`compute_targets` unchanged,
    ``"onestep"`` and ``"verify"`` are :func:`compute_fast_targets`."""
    if config is None or config.method == "adam":
        return compute_targets(lm, layer, requests, prefixes, config, batch_size=batch_size, paraphrases=paraphrases)
    return compute_fast_targets(lm, layer, requests, prefixes, config, batch_size=batch_size, paraphrases=paraphrases)


def compute_fast_targets(lm, layer: int, requests, prefixes, config: TargetConfig, *,
                         batch_size: int = TARGET_BATCH_SIZE,
                         paraphrases: list[list[str]] | None = None) -> TargetResult:
    """``z_i = h_i + δ_i`` by one gradient and a line search (module doc); ``steps`` counts
    the Adam steps of ``"verify"``'s refinement (0 for requests the line search settled)."""
    method = getattr(config, "method", None)
    if method not in ("onestep", "verify"):
        raise ValueError(f"compute_fast_targets needs a TargetConfig with method 'onestep' or 'verify', got {method!r}")
    return _run_prepared(lm, layer, requests, prefixes, config, batch_size, _fast, paraphrases)


def _gradient_at_zero(lm, problem, groups) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row NLL (u, P) at δ = 0, g = ∇_δ Σ_i L_i at δ = 0 (u, d_model))``; sets every
    group's KL reference."""
    u, P = problem.n_requests, problem.n_prefixes
    delta = torch.zeros((u, lm.d_model), dtype=torch.float32, device=lm.device, requires_grad=True)
    row_nll = torch.zeros(u * P, device=lm.device)
    for g in groups:
        with torch.enable_grad():
            tok_nll, _kl, kl_logp, _top1 = _replay(lm, problem, g, delta[problem.row_req[g.rows]])
            # the KL rows add nothing at δ = 0 (headloss.py zeroes their value and gradient
            # while the reference is taken); δ_i reaches only request i's rows
            (tok_nll.sum() / P).backward()
        g.kl_ref = kl_logp
        row_nll.index_add_(0, problem.tgt_row[g.tgt], tok_nll[0].detach())
    grad = delta.grad if delta.grad is not None else torch.zeros_like(delta)
    return row_nll.view(u, P), grad.detach()


def _line_search(lm, problem, groups, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row NLL (u, K, P), KL (u, K))`` at every candidate ``δ`` of ``candidates (u, K, d)``,
    the candidates of a group riding as extra rows of one forward (up to :data:`CANDIDATE_ROWS`)."""
    u, K, _ = candidates.shape
    P = problem.n_prefixes
    row_nll = torch.zeros((u * P, K), device=lm.device)
    kl = torch.zeros((u, K), device=lm.device)
    with torch.no_grad():
        for g in groups:
            n = g.rows.numel()
            # a group of one row cannot be told from broadcast arguments (forward.select_rows)
            per_pass = 1 if g.calls.batch == 1 else max(1, CANDIDATE_ROWS // n)
            req = problem.row_req[g.rows]
            for a in range(0, K, per_pass):
                b = min(K, a + per_pass)
                shift = candidates[req, a:b].transpose(0, 1).reshape((b - a) * n, -1)   # copy-major
                tok_nll, kl_group, _, _ = _replay(lm, problem, g, shift, copies=b - a)
                row_nll[:, a:b].index_add_(0, problem.tgt_row[g.tgt], tok_nll.T)
                kl[g.kl_req, a:b] = kl_group.T
    return row_nll.view(u, P, K).transpose(1, 2), kl


def _fast(lm, layer: int, requests, problem, config: TargetConfig, batch_size: int) -> TargetResult:
    u, device = len(requests), lm.device
    groups = _groups(lm, layer, problem, batch_size)
    initial = _initial_states(lm, layer, requests, problem, groups)
    init_norm = initial.norm(dim=-1)                                                   # (u,)
    zero_rows, grad = _gradient_at_zero(lm, problem, groups)
    direction = -grad / grad.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(grad.dtype).tiny)
    sizes = sorted({min(s, config.clamp_norm_factor) for s in config.step_sizes})
    scale = torch.tensor(sizes, dtype=torch.float32, device=device)                   # (K,)
    candidates = (scale.view(1, -1, 1) * init_norm.view(-1, 1, 1)) * direction.unsqueeze(1)  # (u, K, d)
    cand_rows, cand_kl = _line_search(lm, problem, groups, candidates)
    # column 0: δ = 0 (no KL, no size term), then the candidates by increasing size
    rows = torch.cat([zero_rows.unsqueeze(1), cand_rows], dim=1)                       # (u, 1+K, P)
    nll = rows.mean(dim=2)                                                             # (u, 1+K)
    size = torch.cat([torch.zeros((u, 1), device=device),
                      _size(candidates, init_norm.unsqueeze(1), config)], dim=1)
    loss = nll + config.kl_factor * torch.cat([torch.zeros((u, 1), device=device), cand_kl], dim=1) + size
    reach = nll < config.accept_nll
    pick = torch.where(reach.any(dim=1), reach.float().argmax(dim=1), loss.argmin(dim=1))   # first reaching
    everything = torch.cat([torch.zeros((u, 1, lm.d_model), device=device), candidates], dim=1)
    at = torch.arange(u, device=device)
    delta = everything[at, pick]
    losses, probs = loss[at, pick], torch.exp(-rows[at, pick]).mean(dim=1)
    z, steps = initial + delta, torch.zeros(u, dtype=torch.long, device=device)
    short = ~reach[at, pick]
    if config.method == "verify" and bool(short.any()):
        refine = replace(config, early_stop_nll=max(config.early_stop_nll, config.accept_nll))
        refined = _adam(lm, layer, requests, problem, refine, groups, initial, start=delta, active=short,
                        keep_best=True)
        z = torch.where(short.unsqueeze(1), refined.z, z)
        losses = torch.where(short, refined.losses, losses)
        probs = torch.where(short, refined.target_prob, probs)
        steps = refined.steps
    return TargetResult(z=z, initial=initial, losses=losses, target_prob=probs, steps=steps)
