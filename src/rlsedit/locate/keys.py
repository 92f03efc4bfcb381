"""Keys: what block ``layer``'s MLP down projection reads at the subject's last token.

For request ``i`` with prompt text ``x_i`` and context prefixes ``p_1..p_P``:

    k_i = (1/P) Σ_p  mlp_down_in_layer( p.replace("{}", x_i) )[s_{i,p}]      (d_k,)

where ``s_{i,p}`` is the subject's last token in that text (MEMIT ``compute_ks``: the
average over context templates of the down-projection input at the subject's last
token). The keys of a batch are the columns of ``K (d_k, u)``.
"""

from __future__ import annotations

import torch

from ..errors import NumericalError
from ..model.weights import down_proj
from .forward import read_module
from .tokens import (check_layer, check_prefixes, encode_through_subject, length_sorted_chunks, pad_id,
                     pad_right, prompt_texts)

DEFAULT_BATCH_SIZE = 64
"""Sequences per forward pass (bounds memory; results do not depend on it)."""


def compute_keys(lm, layer: int, requests, prefixes, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The keys ``K (d_k, u)`` float32 of ``requests`` at block ``layer``.

    Args:
        lm: the loaded model.
        layer: the block whose down projection is edited.
        requests: the batch's :class:`~rlsedit.requests.EditRequest` objects (``u`` of them).
        prefixes: context prefixes, each with one ``{}`` for the prompt
            (:func:`~rlsedit.locate.prefixes.context_prefixes`).
        batch_size: sequences per forward pass; every request × prefix text runs in
            length-sorted, right-padded batches and the forward stops at the down projection.

    Raises:
        InvalidRequestError: a subject missing from its prompt, a text longer than the
            model's context, a bad layer or prefix.
        NumericalError: the model produced non-finite keys.
    """
    layer = check_layer(lm, layer)
    prefixes = check_prefixes(prefixes)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    requests = list(requests)
    items = prompt_texts(requests, prefixes)
    ids, positions = encode_through_subject(lm, items)
    module = down_proj(lm, layer)
    rows = torch.empty((len(items), lm.d_k), dtype=torch.float32, device=lm.device)  # (u·P, d_k)
    for chunk in length_sorted_chunks([len(s) for s in ids], batch_size):
        input_ids, attention_mask = pad_right([ids[i] for i in chunk], pad_id(lm), lm.device)
        keys_in = read_module(lm, module, input_ids, attention_mask, read="input")  # (b, L, d_k)
        index = torch.tensor(chunk, device=lm.device)
        pos = torch.tensor([positions[i] for i in chunk], device=lm.device)
        rows[index] = keys_in[torch.arange(len(chunk), device=lm.device), pos].float()
    # k_i = mean over prefixes; rows are request-major, so (u, P, d_k) -> (u, d_k) -> (d_k, u)
    K = rows.view(len(requests), len(prefixes), lm.d_k).mean(dim=1).T.contiguous()
    if not torch.isfinite(K).all():
        bad = [requests[i].id for i in torch.nonzero(~torch.isfinite(K).all(dim=0)).flatten().tolist()]
        raise NumericalError(f"layer {layer}: non-finite keys for edits {bad}")
    return K
