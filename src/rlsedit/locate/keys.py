"""Keys: what block ``layer``'s MLP down projection reads at the subject's last token.

For request ``i`` with prompt text ``x_i`` and context prefixes ``p_1..p_P``:

    k_i = Σ_p  w_p · mlp_down_in_layer( p.replace("{}", x_i) )[s_{i,p}]      (d_k,)

where ``s_{i,p}`` is the subject's last token in that text and ``w`` the prefix weights
(:func:`prefix_weights`, summing to 1). MEMIT's, AlphaEdit's and RLSEdit's ``compute_ks``
take the mean over template *types* of the mean within each type; their types are the bare
prompt ``["{}"]`` and the generated prefixes, so the bare prompt weighs ½ and each of the
``P − 1`` generated prefixes ``½/(P − 1)`` (``average="per_type"``). ROME's ``compute_u``
averages its flat template list uniformly, ``w_p = 1/P`` (``average="uniform"``). The keys
of a batch are the columns of ``K (d_k, u)``.
"""

from __future__ import annotations

import torch

from ..errors import NumericalError
from ..model.weights import down_proj
from ..requests import SUBJECT_SLOT
from .forward import read_module
from .tokens import (check_layer, check_prefixes, encode_through_subject, length_sorted_chunks, pad_id,
                     pad_right, prompt_texts)

DEFAULT_BATCH_SIZE = 64
"""Sequences per forward pass (bounds memory; results do not depend on it)."""

AVERAGES = ("per_type", "uniform")
"""How keys are averaged over prefixes: MEMIT's mean of per-type means, or a plain mean."""


def prefix_weights(prefixes, average: str = "per_type") -> torch.Tensor:
    """Weights ``w (P,)`` float64 (summing to 1) of the prefixes in a key average.

    ``"per_type"`` (``memit/compute_ks.py``): the bare prompt ``"{}"`` and the generated
    prefixes are two types; each type weighs 1/(number of types present) and shares it
    equally among its members, so with one bare and five generated prefixes the bare prompt
    weighs ½ and each generated one 1/10; a chat context prefix (``chat_prefix``) is one more
    non-bare prefix, so the bare prompt keeps ½. ``"uniform"``: ``1/P`` each (ROME ``compute_u``).
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    prefixes = check_prefixes(prefixes)
    P = len(prefixes)
    if average == "uniform":
        return torch.full((P,), 1.0 / P, dtype=torch.float64)
    bare = torch.tensor([p == SUBJECT_SLOT for p in prefixes])
    types = [t for t in (bare, ~bare) if t.any()]
    w = torch.zeros(P, dtype=torch.float64)
    for members in types:
        w[members] = 1.0 / (len(types) * int(members.sum()))
    return w


def compute_keys(lm, layer: int, requests, prefixes, *, average: str = "per_type",
                 batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The keys ``K (d_k, u)`` float32 of ``requests`` at block ``layer``.

    Args:
        lm: the loaded model.
        layer: the block whose down projection is edited.
        requests: the batch's :class:`~rlsedit.requests.EditRequest` objects (``u`` of them).
        prefixes: context prefixes, each with one ``{}`` for the prompt
            (:func:`~rlsedit.locate.prefixes.context_prefixes`).
        average: ``"per_type"`` (MEMIT/AlphaEdit/RLSEdit) or ``"uniform"`` (ROME), see
            :func:`prefix_weights`.
        batch_size: sequences per forward pass; every request × prefix text runs in
            length-sorted, right-padded batches and the forward stops at the down projection.

    Raises:
        InvalidRequestError: a subject missing from its prompt, a text longer than the
            model's context, a bad layer or prefix.
        NumericalError: the model produced non-finite keys.
    """
    layer = check_layer(lm, layer)
    prefixes = check_prefixes(prefixes)
    weights = prefix_weights(prefixes, average).to(device=lm.device, dtype=torch.float32)  # (P,)
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
    # k_i = Σ_p w_p · row_{i,p}; rows are request-major, so (u, P, d_k) -> (u, d_k) -> (d_k, u)
    K = torch.einsum("p,upd->ud", weights, rows.view(len(requests), len(prefixes), lm.d_k)).T.contiguous()
    if not torch.isfinite(K).all():
        bad = [requests[i].id for i in torch.nonzero(~torch.isfinite(K).all(dim=0)).flatten().tolist()]
        raise NumericalError(f"layer {layer}: non-finite keys for edits {bad}")
    return K
