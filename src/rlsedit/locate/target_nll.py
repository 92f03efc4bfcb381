"""FT-L's objective: each request's mean target-token NLL, computed only where it is read.

    L = (1/u) Σ_i (1/T_i) Σ_t −log p(y_{i,t} | x_i ⊕ y_{i,<t})

(``ft_main``'s per-request mean, then the mean over requests; each target token is predicted
from the prompt and the target tokens before it, teacher forcing). Fine-tuning the
down-projections of layers ``first..`` leaves every block below ``first`` as it was, so the
state entering block ``first`` is captured once per batch (:func:`capture_entering`) and each
optimiser step runs only blocks ``first..n−1``. The LM head runs only at the positions that
predict a target token (:func:`head_losses`), not at every position of every row: on Gemma 3's
262,144-token vocabulary the full logits of a batch of 100 requests are about 2 GB of float32,
and their log-softmax and its backward cost more than the blocks. The value and gradient are
those of the full-logits loss up to float rounding.
"""

from __future__ import annotations

import torch

from ..requests import target_text
from .forward import capture_entering, run_blocks
from .headloss import head_losses
from .tokens import pad_id


def _nll_batch(lm, requests) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids ``(u, L)`` of prompt+target, their attention mask and the mask
    ``(u, L)`` of target tokens."""
    tok = lm.tokenizer
    rows, masks = [], []
    for r in requests:
        prompt_ids = tok(r.text, add_special_tokens=True)["input_ids"]
        target_ids = tok(target_text(r.target_new), add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + target_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(target_ids))
    width = max(len(x) for x in rows)
    pad = pad_id(lm)  # never read: it sits after every real token, masked out
    ids = torch.tensor([x + [pad] * (width - len(x)) for x in rows], device=lm.device)
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows], device=lm.device)
    target_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=lm.device, dtype=torch.bool)
    return ids, attention, target_mask


class TargetNLL:
    """``L`` above for ``requests`` as a function of the weights of blocks ``first..``:
    calling it runs those blocks and returns the scalar loss, with gradients when grad mode is
    on and the weights require them. Prepare it once per batch, after which the weights of the
    blocks below ``first`` must not change."""

    def __init__(self, lm, requests, first: int):
        self.lm, self.first = lm, first
        ids, attention, target_mask = _nll_batch(lm, requests)
        self.entering, self.calls = capture_entering(lm, first, lm.n_layers - 1, ids, attention)
        # position t predicts token t+1: read the positions just before each target token
        self.rows, cols = torch.nonzero(target_mask[:, 1:], as_tuple=True)
        self.cols = cols
        self.target_ids = ids[self.rows, cols + 1]
        self.counts = target_mask.sum(dim=1).float()  # T_i ≥ 1: every target has a token
        self.requests = len(requests)

    def __call__(self) -> torch.Tensor:
        out = run_blocks(self.lm, self.entering, self.calls, self.first, self.lm.n_layers)
        nll, _, _ = head_losses(self.lm, out[self.rows, self.cols], self.target_ids, None)
        per_request = torch.zeros(self.requests, dtype=torch.float32, device=nll.device)
        per_request = per_request.index_add(0, self.rows, nll.float()) / self.counts
        return per_request.mean()
