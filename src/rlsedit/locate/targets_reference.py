"""The value-target objective solved one request at a time through the whole model.

This is MEMIT's ``compute_z`` loop, kept as the reference that the batched
:func:`~rlsedit.locate.targets.compute_targets` is tested against and timed against
(``Editor(targets="reference")``, ``rlsedit bench speed``): the same objective and stop rules,
with ``δ`` added by a forward hook and full logits from the model.
"""

from __future__ import annotations

import logging

import torch

from ..model.hooks import edit_output
from ..model.weights import block
from .target_config import TARGET_BATCH_SIZE, TargetConfig
from .targets import (TargetResult, _build_problem, _check_finite, _clamp_, _empty, _kl, _prepare,
                      _size, hidden_at_subject)
from .tokens import pad_id, pad_right

log = logging.getLogger(__name__)


def compute_targets_reference(lm, layer: int, requests, prefixes, config: TargetConfig | None = None, *,
                              batch_size: int = TARGET_BATCH_SIZE,
                              paraphrases: list[list[str]] | None = None) -> TargetResult:
    """The same objective, one request at a time through the whole model.

    For each request: its rewriting and KL prompts in one padded batch, ``δ`` added to the
    output of block ``layer`` by a forward hook, full logits from ``lm.model``, Adam on ``δ``
    (the loop of MEMIT's ``compute_z``). Slower than :func:`compute_targets`; same math.
    ``batch_size`` is accepted for a uniform signature and unused.
    """
    layer, requests, prefixes, config = _prepare(lm, layer, requests, prefixes, config, batch_size)
    if not requests:
        return _empty(lm)
    problem = _build_problem(lm, requests, prefixes, config, paraphrases)
    device, P = lm.device, problem.n_prefixes
    z, initial, losses, probs, steps_used = [], [], [], [], []
    for i in range(len(requests)):
        rows = torch.nonzero(problem.row_req == i).flatten()   # P rewriting rows, then the KL row
        local = torch.full_like(problem.row_req, -1)
        local[rows] = torch.arange(rows.numel(), device=device)
        input_ids, attention_mask = pad_right([problem.ids[r] for r in rows.tolist()], pad_id(lm), device)
        subj = problem.row_subj[rows]                           # (P + 1,)
        tgt = torch.nonzero(problem.row_req[problem.tgt_row] == i).flatten()
        kl_local = int(local[problem.kl_row[i]])
        plain_local = None if problem.plain_row is None else int(local[problem.plain_row[i]])

        seen: list[torch.Tensor] = []
        delta = torch.zeros(lm.d_model, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=config.lr)
        batch_rows = torch.arange(rows.numel(), device=device)

        def add_delta(out):
            if not seen and plain_local is not None:  # h: the unedited state on the bare prompt
                seen.append(out[plain_local, subj[plain_local]].detach().float())
            return out.index_put((batch_rows, subj), delta.to(out.dtype).expand(rows.numel(), -1), accumulate=True)

        kl_init, h_init, used = None, None, 0
        for step in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                with edit_output(block(lm, layer), add_delta):
                    logits = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                logp = torch.log_softmax(logits.float(), dim=-1)                       # (P + 1, L, V)
                tok_logp = logp[local[problem.tgt_row[tgt]], problem.tgt_pos[tgt]].gather(
                    1, problem.tgt_id[tgt].unsqueeze(1)).squeeze(1)                    # (e,)
                row_nll = torch.zeros(P, device=device).index_add(
                    0, local[problem.tgt_row[tgt]], -tok_logp * problem.tgt_scale[tgt])  # (P,)
                kl_logp = logp[kl_local, subj[kl_local]].unsqueeze(0)                 # (1, V)
                tgt_logits = logits[local[problem.tgt_row[tgt]], problem.tgt_pos[tgt]]  # (e, V)
                all_top1 = bool((tgt_logits.gather(1, problem.tgt_id[tgt].unsqueeze(1)).squeeze(1)
                                 >= tgt_logits.amax(dim=-1)).all())
                if kl_init is None:
                    kl_init = kl_logp.detach().clone()
                    h_init = seen[0] if seen else hidden_at_subject(lm, layer, [requests[i]])[0]
                loss = row_nll.mean() + config.kl_factor * _kl(kl_logp, kl_init)[0] \
                    + _size(delta.unsqueeze(0), h_init.norm().view(1), config)[0]
            _check_finite(loss.view(1), requests, torch.tensor([i]), layer)
            log.debug("reference layer %d edit %r step %d: loss %.4f, p(target) %.4f",
                      layer, requests[i].id, step, loss.item(), torch.exp(-row_nll).mean().item())
            if loss.item() < config.early_stop_loss or row_nll.mean().item() < config.early_stop_nll \
                    or (config.early_stop_top1 and all_top1) or step == config.steps - 1:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                _clamp_(delta.view(1, -1), config.clamp_norm_factor * h_init.norm().view(1))
            used += 1
        z.append(h_init + delta.detach())
        initial.append(h_init)
        losses.append(loss.detach())
        probs.append(torch.exp(-row_nll.detach()).mean())
        steps_used.append(used)
    return TargetResult(z=torch.stack(z), initial=torch.stack(initial), losses=torch.stack(losses),
                        target_prob=torch.stack(probs),
                        steps=torch.tensor(steps_used, dtype=torch.long, device=device))
