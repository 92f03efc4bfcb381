"""FT-L (the constrained fine-tuning baseline of ROME/MEMIT) on the same edited layers.

Per batch: Adam on the down-projection weights of the edited layers to minimise FT-L's objective,
each request's mean target-token NLL, then the mean over requests, as ``ft_main``
(:class:`~rlsedit.locate.target_nll.TargetNLL`: the blocks from the lowest edited layer up, the LM
head only where a target token is predicted); after every step the weights are clamped to an ℓ∞
ball of radius ``norm_constraint`` around their values at the start of the batch, and the loop
stops before a step once the loss is below 1e-2 (``ft_main``'s early stop). No keys, no targets:
its journal record stores the new weights.

One deliberate difference from ``kmeng01/rome`` / ``kmeng01/memit`` ``baselines/ft/ft_main.py``:
there every target token's log-probability is read at the prompt's *last* position (the
logits that predict only the first target token); here each target token is predicted from
the prompt and the target tokens before it (teacher forcing, as EasyEdit's FT), so the loss
is the target's NLL. For one-token targets the two are the same.
"""

from __future__ import annotations

import time

import torch

from ..locate.target_nll import TargetNLL
from ..model.weights import down_proj, get_W, set_W
from .base import EditRecord, Editor, Proposal, _check_finite
from .config import FTConfig


EARLY_STOP_LOSS = 1e-2
"""``ft_main`` takes no step once the loss is below this."""


class FT(Editor):
    config_class = FTConfig
    name = "ft"
    logs_value_targets = False  # its own batch procedure; a target log is not consulted
    needs_moments = False

    def _compute_batch(self, requests):
        c = self.config
        start_time = time.perf_counter()
        loss_of_weights = TargetNLL(self.lm, requests, min(self.layers))
        params = [down_proj(self.lm, l).weight for l in self.layers]
        start = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=c.lr)
        try:
            for _ in range(c.num_steps):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of_weights()
                if not torch.isfinite(loss) or float(loss.detach()) < EARLY_STOP_LOSS:
                    break
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # ℓ∞ ball around the batch's starting weights
                    for p, p0 in zip(params, start):
                        p.copy_(torch.clamp(p, p0 - c.norm_constraint, p0 + c.norm_constraint))
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        ids = tuple(r.id for r in requests)
        tensors = {}
        for l in self.layers:
            W = get_W(self.lm, l)
            _check_finite(f"layers.{l}.W", W, ids)
            tensors[f"layers.{l}.W"] = W
        return EditRecord(ids=ids, tensors=tensors, info={"final_loss": float(loss.detach()),
                                                                 "seconds": {"finetune": time.perf_counter() - start_time}}), {}

    def apply_record(self, record: EditRecord) -> None:
        old = {l: get_W(self.lm, l) for l in self.layers}
        for l in self.layers:
            set_W(self.lm, l, record.tensors[f"layers.{l}.W"])
        Proposal(self, record, {}, old).commit()
