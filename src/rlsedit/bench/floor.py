"""The arithmetic floor of an edit batch: matrix-product FLOPs from the batch's real token
counts, and this machine's measured matrix-product rate to turn them into seconds.

Counted (``P_b`` = parameters of one block's matrices, ``P_h`` = vocabulary × d_model,
``N`` blocks, ``L`` the top edited layer; a forward costs 2 FLOPs per parameter per token,
a backward to the activations only another 2 — the weights need no gradients):

* targets, setup: one forward of every row (P prefixes + the KL prompt per request), its
  real tokens through all ``N`` blocks;
* targets, per optimisation step of a request: its rows' tokens from the subject on through
  blocks ``L+1..N-1`` forward and backward (4·P_b each), and the LM head at the positions a
  loss reads (4·P_h each); the step that stops a request is forward only;
* keys, per edited layer ``l``: every row's tokens up to the subject through blocks ``0..l``,
  and the bare prompt up to the subject through ``0..L`` (the current ``h``), forward only;
* solve, per layer: the RLS update's ``C·K`` and rank-``u`` downdate (``4·d_k²·u``) and the
  weight update (``4·d_k·d_v·u``).

Attention scores, norms and element-wise work are left out (a few per cent at these lengths),
so the floor is a lower bound on what any implementation of the same computation needs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..locate.tokens import encode_at_subject, prompt_texts
from ..model.weights import block
from ..requests import SUBJECT_SLOT, EditRequest, target_text
from .solver import median_time


def _matrix_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def batch_flops(lm, layers: Sequence[int], requests: Sequence[EditRequest], prefixes: Sequence[str],
                steps: Sequence[int], kl_prompt: str = "{} is a") -> dict[str, float]:
    """FLOPs of one batch by phase (``targets``, ``keys``, ``solve``); ``steps[i]`` is the
    number of Adam steps request ``i`` took (the journal's ``target_steps``)."""
    requests = list(requests)
    n, top = lm.n_layers, max(layers)
    p_block = _matrix_params(block(lm, 0))
    p_head = lm.d_model * int(lm.model.config.get_text_config().vocab_size)
    P = len(prefixes)
    ids, subj = encode_at_subject(lm, prompt_texts(requests, list(prefixes)))
    _, bare_subj = encode_at_subject(lm, prompt_texts(requests, [SUBJECT_SLOT]))
    kl_texts = [kl_prompt.replace(SUBJECT_SLOT, r.subject) for r in requests]

    targets = 0.0
    keys = 0.0
    for i, r in enumerate(requests):
        t_len = len(lm.tokenizer(target_text(r.target_new), add_special_tokens=False)["input_ids"])
        rows = range(i * P, (i + 1) * P)
        row_len = [len(ids[k]) + t_len - 1 for k in rows]                   # prompt ⊕ y_<T
        kl_len = len(lm.tokenizer(kl_texts[i])["input_ids"])
        setup_tokens = sum(row_len) + kl_len
        replay_tokens = sum(length - subj[k] for length, k in zip(row_len, rows)) + 1
        loss_positions = P * t_len + 1
        per_eval_fwd = 2 * (replay_tokens * p_block * (n - top - 1) + loss_positions * p_head)
        evals_bwd, evals_fwd = steps[i], 1
        targets += 2 * setup_tokens * p_block * n + per_eval_fwd * (2 * evals_bwd + evals_fwd)
        for l in layers:
            keys += 2 * sum(subj[k] + 1 for k in rows) * p_block * (l + 1)
            keys += 2 * (bare_subj[i] + 1) * p_block * (top + 1)
    u = len(requests)
    d_v = lm.d_model
    solve = len(layers) * (4 * lm.d_k**2 * u + 4 * lm.d_k * d_v * u)
    return {"targets": float(targets), "keys": float(keys), "solve": float(solve)}


def matmul_rate(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                shape: tuple[int, int, int] = (1024, 576, 1536), repeats: int = 20) -> float:
    """Measured FLOP/s of one ``(m, k) @ (k, n)`` product (median of ``repeats``)."""
    m, k, n = shape
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * k * n / median_time(lambda: a @ b, repeats, torch.device(device))


def floor_summary(flops: dict[str, float], n_edits: int, rates: dict[str, float]) -> dict[str, Any]:
    """Per-edit FLOPs and floor seconds of each phase; ``rates`` has ``float32`` and, when the
    targets ran in bfloat16, ``targets`` (the rate their products run at)."""
    per_edit = {k: v / n_edits for k, v in flops.items()}
    seconds = {k: per_edit[k] / rates.get(k, rates["float32"]) for k in per_edit}
    return {"gflop_per_edit": {k: v / 1e9 for k, v in per_edit.items()},
            "floor_seconds_per_edit": seconds,
            "floor_seconds_per_edit_total": sum(seconds.values()),
            "matmul_gflops": {k: v / 1e9 for k, v in rates.items()}}
