"""Targets: the residual-stream state after block ``layer`` that makes ``target_new`` likely.

For request ``i`` with subject-last-token state ``h_i`` (output of block ``layer`` on the
bare prompt) we look for a shift ``δ_i`` that, added at the subject's last token of every
prompt of the request, minimises the ROME/MEMIT objective (``memit/compute_z.py``)

    L_i(δ) = (1/P) Σ_p (1/T) Σ_t −log P(y_t | p(x_i) ⊕ y_<t ; h_s += δ)          (rewrite)
           + kl_factor · KL( P(· | kl(x_i); h_s += δ) ‖ P(· | kl(x_i)) )           (essence)
           + weight_decay · ‖δ‖ / ‖h_i‖²                                           (size)

with ``p`` the context prefixes, ``y_1..y_T`` the tokens of ``" " + target_new`` (teacher
forcing: the prompt is followed by ``y_<T``), ``kl(x_i)`` the prompt ``"{subject} is a"``
read at the subject's last token, and the KL measured against the unedited model.
Adam on ``δ``; after every step ``δ`` is pulled back into the ball
``‖δ‖ ≤ clamp_norm_factor · ‖h_i‖``; a request stops once ``L_i`` is below
``early_stop_loss`` or its mean target NLL below ``early_stop_nll`` (its ``δ`` is then frozen),
or, with ``early_stop_top1``, once every target token is the most probable token under every
one of its prompts (teacher-forced: the target is the greedy continuation of each prompt;
ENCORE's most-probable early stopping, Gupta et al. 2025, arXiv 2502.01636). The result is
``z_i = h_i + δ_i``.

Two details follow the official code (``memit/compute_z.py``, ``AlphaEdit/compute_z.py``)
where a squared-norm or last-token reading would differ: the size term is ``‖δ‖/‖h‖²``
(the norm itself, not squared), and the KL term compares the next-token distributions at
the subject's last token of the KL prompt, not at the prompt's last token.

:func:`compute_targets` optimises all requests of a batch at once (one ``δ`` row each,
one Adam step per step over every request × prefix prompt and every KL prompt, replaying
only the blocks above ``layer`` and only each row's tokens from its subject on — rows are
left-padded so all subjects share one column — from states and key/value caches computed once;
optionally with the model's weights in bfloat16, ``TargetConfig.dtype``);
:func:`compute_targets_reference` is the straightforward per-request loop through the
whole model with a hook, kept for tests and the speed benchmark.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..errors import InvalidRequestError, NumericalError
from ..model.weights import block
from ..requests import SUBJECT_SLOT, EditRequest, target_text
from .forward import BlockCalls, capture_above, read_module, run_above, select_rows
from .headloss import head_losses
from .target_config import TARGET_BATCH_SIZE, TARGET_DTYPES, TargetConfig
from .tokens import (check_layer, check_length, check_prefixes, encode_at_subject, encode_through_subject,
                     fill_subject, length_sorted_chunks, pad_id, pad_right, prompt_texts, request_template)

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
"""Rows (token sequences) per forward pass of :func:`hidden_at_subject`."""

DTYPES = {name: getattr(torch, name) for name in TARGET_DTYPES}


@contextmanager
def weights_in(lm, dtype: torch.dtype):
    """Run the model with every parameter cast to ``dtype``; the original tensors (not copies)
    come back on exit, so the weights are bit-for-bit what they were.

    The cast copies are kept in ``lm.cache`` and reused while a parameter is unchanged (same
    storage, same version counter — every in-place write, e.g. :func:`set_W`, bumps it), so a
    stream recasts only the layers it edited. Casting the whole model afresh for every batch
    grew a loop of target batches by ~40 MB per batch on CPU; it was one cause, not the only
    one, of the bfloat16 stream's growth in benchmarks/SPEED.md.

    Buffers (rotary frequencies) stay as they are; the model casts what it derives from them
    to the hidden states' dtype.
    """
    memo: dict[str, tuple] = lm.cache.setdefault(("weights_in", dtype), {})
    params = [(name, p) for name, p in lm.model.named_parameters() if p.dtype != dtype]
    originals = [p.data for _, p in params]
    try:
        for name, p in params:
            key = (p.data_ptr(), p._version, tuple(p.shape))
            hit = memo.get(name)
            if hit is None or hit[0] != key:
                memo[name] = hit = (key, p.detach().to(dtype))
            p.data = hit[1]
        yield
    finally:
        for (_, p), original in zip(params, originals):
            p.data = original


def _attention_for(lm, dtype: str):
    """PyTorch's composed ("math") attention for bfloat16 on CPU: at these small shapes the
    fused CPU kernel's bfloat16 backward costs more than the whole block's matrix products
    (benchmarks/SPEED.md)."""
    if dtype == "bfloat16" and torch.device(lm.device).type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


@dataclass
class TargetResult:
    """What :func:`compute_targets` found, one row per request.

    Attributes:
        z: ``(u, d_model)`` the target state ``h + δ`` after block ``layer``.
        initial: ``(u, d_model)`` the current state ``h`` there (bare prompt).
        losses: ``(u,)`` the objective at the returned ``δ``.
        target_prob: ``(u,)`` mean over prefixes of ``exp(−mean token NLL)`` of the target
            at the returned ``δ``.
        steps: ``(u,)`` Adam steps applied to each ``δ``.
    """

    z: torch.Tensor
    initial: torch.Tensor
    losses: torch.Tensor
    target_prob: torch.Tensor
    steps: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        return self.z - self.initial



@dataclass
class _Problem:
    """Token rows and index tensors of one batch of requests (built once, reused every step).

    Rows ``0..u·P-1`` are the rewriting prompts (request-major: row ``i·P + p`` is request
    ``i`` under prefix ``p``), rows ``u·P..u·P+u-1`` the KL prompts, cut after the subject
    (the KL term reads the subject's last token; under causal attention later tokens cannot
    change it). ``E`` counts target tokens over all rewriting rows.
    """

    ids: list[list[int]]
    row_req: torch.Tensor      # (R,)  request of each row
    row_subj: torch.Tensor     # (R,)  subject's last token in each row
    tgt_row: torch.Tensor      # (E,)  row of each target token
    tgt_pos: torch.Tensor      # (E,)  position whose logits predict it
    tgt_id: torch.Tensor       # (E,)  its token id
    tgt_scale: torch.Tensor    # (E,)  1 / T of its request (mean over target tokens)
    kl_row: torch.Tensor       # (u,)
    plain_row: torch.Tensor | None  # (u,) row of the bare "{}" prefix, if present
    n_requests: int
    n_prefixes: int


def _build_problem(lm, requests: list[EditRequest], prefixes: list[str], config: TargetConfig,
                   paraphrases: list[list[str]] | None = None) -> _Problem:
    for r in requests:
        request_template(r)  # validates every subject before any model work
    texts = prompt_texts(requests, prefixes, paraphrases)
    u = len(requests)
    P = len(texts) // u  # the prefixes, then each request's extra templates
    prompt_ids, prompt_subj = encode_at_subject(lm, texts)
    kl_items = [fill_subject(config.kl_prompt, r.subject, f"edit {r.id!r}") for r in requests]
    kl_ids, kl_subj = encode_through_subject(lm, kl_items)

    ids: list[list[int]] = []
    tgt_row, tgt_pos, tgt_id, tgt_scale = [], [], [], []
    for i, request in enumerate(requests):
        if not isinstance(request.target_new, str) or not request.target_new.strip():
            raise InvalidRequestError(f"edit {request.id!r}: target_new is empty")
        target = lm.tokenizer(target_text(request.target_new), add_special_tokens=False)["input_ids"]
        if not target:
            raise InvalidRequestError(f"edit {request.id!r}: target_new {request.target_new!r} has no tokens")
        for p in range(P):
            row = i * P + p
            seq = prompt_ids[row] + list(target[:-1])  # teacher forcing: prompt ⊕ y_<T
            check_length(lm, seq, f"edit {request.id!r}")
            ids.append(seq)
            first = len(prompt_ids[row]) - 1  # the logits here predict y_1
            tgt_row.extend([row] * len(target))
            tgt_pos.extend(range(first, first + len(target)))
            tgt_id.extend(int(t) for t in target)
            tgt_scale.extend([1.0 / len(target)] * len(target))
    ids.extend(kl_ids)
    device = lm.device
    plain = prefixes.index(SUBJECT_SLOT) if SUBJECT_SLOT in prefixes else None
    long = dict(dtype=torch.long, device=device)
    return _Problem(
        ids=ids,
        row_req=torch.tensor([i for i in range(u) for _ in range(P)] + list(range(u)), **long),
        row_subj=torch.tensor(prompt_subj + kl_subj, **long),
        tgt_row=torch.tensor(tgt_row, **long), tgt_pos=torch.tensor(tgt_pos, **long),
        tgt_id=torch.tensor(tgt_id, **long),
        tgt_scale=torch.tensor(tgt_scale, dtype=torch.float32, device=device),
        kl_row=torch.arange(u * P, u * P + u, device=device),
        plain_row=None if plain is None else torch.arange(u, device=device) * P + plain,
        n_requests=u, n_prefixes=P,
    )


def _kl(kl_logp: torch.Tensor, kl_init: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ p0) = Σ_v p_v (log p_v − log p0_v)`` per row (``(k, V)`` log-probs → ``(k,)``);
    MEMIT's ``kl_div(p0, p, log_target=True)``: edited ``p`` against unedited ``p0``."""
    return (kl_logp.exp() * (kl_logp - kl_init)).sum(dim=-1)


def _size(delta: torch.Tensor, init_norm: torch.Tensor, config: TargetConfig) -> torch.Tensor:
    """``weight_decay · ‖δ‖ / ‖h‖²`` per row (MEMIT ``compute_z``; the norm is not squared)."""
    return config.weight_decay * delta.norm(dim=-1) / init_norm.pow(2)


def _check_finite(loss: torch.Tensor, requests: list[EditRequest], req: torch.Tensor, layer: int) -> None:
    bad = ~torch.isfinite(loss)
    if bad.any():
        ids = [requests[i].id for i in req[bad].tolist()]
        raise NumericalError(f"layer {layer}: the target loss became non-finite for edits {ids}; try a lower lr")


def _clamp_(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """``δ ← δ · min(1, max_norm / ‖δ‖)`` row-wise, in place (projection onto the ball)."""
    norm = delta.norm(dim=-1)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(torch.finfo(delta.dtype).tiny),
                        torch.ones_like(norm))
    delta.mul_(scale.unsqueeze(-1))


def hidden_at_subject(lm, layer: int, requests, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The residual stream after block ``layer`` at the subject's last token of each
    request's bare prompt, ``(u, d_model)`` float32 (the forward stops after that block)."""
    layer = check_layer(lm, layer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    requests = list(requests)
    ids, positions = encode_through_subject(lm, prompt_texts(requests, [SUBJECT_SLOT]))
    out = torch.empty((len(requests), lm.d_model), dtype=torch.float32, device=lm.device)
    for chunk in length_sorted_chunks([len(s) for s in ids], batch_size):
        input_ids, attention_mask = pad_right([ids[i] for i in chunk], pad_id(lm), lm.device)
        h = read_module(lm, block(lm, layer), input_ids, attention_mask, read="output")  # (b, L, d)
        pos = torch.tensor([positions[i] for i in chunk], device=lm.device)
        out[torch.tensor(chunk, device=lm.device)] = h[torch.arange(len(chunk), device=lm.device), pos].float()
    return out


def _prepare(lm, layer, requests, prefixes, config, batch_size):
    layer = check_layer(lm, layer)
    prefixes = check_prefixes(prefixes)
    config = TargetConfig() if config is None else config
    if not isinstance(config, TargetConfig):
        raise TypeError(f"config must be a TargetConfig, got {type(config).__name__}")
    config = config.for_model(lm)  # an unset lr: the model family's
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return layer, list(requests), prefixes, config


def _empty(lm) -> TargetResult:
    empty = torch.empty((0, lm.d_model), dtype=torch.float32, device=lm.device)
    none = torch.empty(0, dtype=torch.float32, device=lm.device)
    return TargetResult(z=empty, initial=empty.clone(), losses=none, target_prob=none.clone(),
                        steps=torch.empty(0, dtype=torch.long, device=lm.device))


@dataclass
class _Group:
    """Rows run together: their states after block ``layer`` and the block arguments.

    Each row is left-padded so that every row's subject token falls on the same column
    ``split``; the columns before it (each row's own text before its subject, behind its
    left padding) ran once as a cached prefix. ``base`` and every replay cover the columns
    from the subject on only: replay column ``c`` of row ``r`` is column
    ``problem.row_subj[r] + c`` of that row's own token sequence.
    """

    rows: torch.Tensor     # (g,) global row ids, ascending
    base: torch.Tensor     # (g, W, d) output of block `layer`, unedited, from each subject on
    calls: BlockCalls
    tgt: torch.Tensor      # (e_g,) target entries whose row is in this group
    kl_req: torch.Tensor   # (k_g,) requests whose KL row is in this group
    local: torch.Tensor    # (R,) global row -> index in this group (-1 elsewhere)
    kl_ref: torch.Tensor | None = None  # (k_g, V) unedited log-probs of its KL rows, from step 0

    def keep_active(self, active: torch.Tensor, problem: _Problem) -> bool:
        """Drop the rows of requests that have stopped; False once none is left.

        A stopped request never resumes, so its rows are never replayed again: the group
        shrinks in place (states, prefix cache, block arguments) instead of keeping a
        row-selected copy beside the full one.
        """
        keep = active[problem.row_req[self.rows]]
        if bool(keep.all()):
            return True
        if not bool(keep.any()):
            return False
        sel = torch.nonzero(keep).flatten()
        self.rows = self.rows[sel]
        self.base = self.base.index_select(0, sel)
        self.calls = select_rows(self.calls, sel)
        self.tgt = self.tgt[active[problem.row_req[problem.tgt_row[self.tgt]]]]
        kl_keep = active[self.kl_req]
        self.kl_req = self.kl_req[kl_keep]
        if self.kl_ref is not None:
            self.kl_ref = self.kl_ref[kl_keep]
        self.local = _local_index(self.rows, problem)
        return True


def _replay(lm, problem: _Problem, g: _Group, row_delta: torch.Tensor, *,
            copies: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group's losses with ``δ`` added at every row's subject: ``(tok_nll (copies, e),
    kl (copies, k), kl_log_probs, tok_top1 (copies, e))``, the target entries' ``−log p(y)/T``,
    the KL rows' ``KL(p ‖ p0)`` (zero, and ``p0`` returned, while the group has no reference
    yet) and whether each target entry's token is the most probable one.

    ``row_delta`` is ``(copies·g, d_model)``: with ``copies > 1`` the group's rows run
    ``copies`` times side by side in one forward, copy ``c`` shifted by rows
    ``c·g..(c+1)·g-1`` (several candidate ``δ`` per request in one pass, no autograd).
    """
    n = g.rows.numel()
    base, calls, kl_ref = g.base, g.calls, g.kl_ref
    if copies > 1:
        index = torch.arange(n, device=base.device).repeat(copies)
        base, calls = base.index_select(0, index), select_rows(calls, index)
        kl_ref = None if kl_ref is None else kl_ref.repeat(copies, 1)
    # h[row, s_row] += δ_{request(row)}   on the output of block `layer`
    # (s_row is replay column 0 of every row)
    rows = torch.arange(base.shape[0], device=base.device)
    h = base.index_put((rows, torch.zeros_like(rows)), row_delta.to(base.dtype), accumulate=True)
    out = run_above(lm, h, calls)                                                      # (r, L, d)
    offset = n * torch.arange(copies, device=base.device).unsqueeze(1)                 # (copies, 1)
    kl_rows = problem.kl_row[g.kl_req]
    tgt_rows = problem.tgt_row[g.tgt]
    tgt_col = problem.tgt_pos[g.tgt] - problem.row_subj[tgt_rows]
    read = torch.cat([out[(g.local[tgt_rows] + offset).flatten(), tgt_col.repeat(copies)],
                      out[(g.local[kl_rows] + offset).flatten(), 0]])  # (copies·(e + k), d)
    # −log p(y) per target entry, then KL(p ‖ p0) per KL row; at step 0 (δ = 0)
    # the KL rows' distributions become p0, kept by their group (headloss.py: no
    # vocab-sized tensor is kept for the backward)
    e = g.tgt.numel() * copies
    values, kl_logp, top1 = head_losses(lm, read, problem.tgt_id[g.tgt].repeat(copies), kl_ref)
    values = values.float()  # the loss is float32 whatever the model's dtype
    tok_nll = values[:e].view(copies, -1) * problem.tgt_scale[g.tgt]                  # (copies, e_g)
    return tok_nll, values[e:].view(copies, -1), kl_logp, top1.view(copies, -1)


def _local_index(rows: torch.Tensor, problem: _Problem) -> torch.Tensor:
    local = torch.full_like(problem.row_req, -1)
    local[rows] = torch.arange(rows.numel(), device=rows.device)
    return local


def _subject_aligned(seqs: list[list[int]], subj: list[int], pad: int, device):
    """Token rows left-padded so every subject lands on column ``max(subj)`` and right-padded
    to a common length: ``(input_ids, attention_mask, position_ids, split)``.

    Position ids count real tokens only, so each row sees exactly the positions it has
    alone; padding is masked out of every attention.
    """
    split = max(subj)
    tail = max(len(q) - s for q, s in zip(seqs, subj))
    ids = torch.full((len(seqs), split + tail), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (q, s) in enumerate(zip(seqs, subj)):
        left = split - s
        ids[r, left:left + len(q)] = torch.tensor(q)
        mask[r, left:left + len(q)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device), split


def _groups(lm, layer: int, problem: _Problem, batch_size: int) -> list[_Group]:
    """Rows sorted by the length from their subject on, split evenly into the fewest groups
    of at most ``batch_size`` (even sizes: the largest group sets the memory, the count the
    per-call overhead).

    Columns before a row's subject cannot change under the edit, so they run once as a
    cached prefix. Aligning every row's subject on one column (left padding) makes the
    replayed width of a group its longest subject-to-end span, whatever the prefixes'
    lengths; sorting by that span keeps the right padding small.
    """
    subj = problem.row_subj.tolist()
    span = [len(q) - s for q, s in zip(problem.ids, subj)]
    order = sorted(range(len(problem.ids)), key=lambda r: (span[r], subj[r]))
    groups = []
    n_groups = -(-len(order) // batch_size)
    bounds = [len(order) * g // n_groups for g in range(n_groups + 1)]
    for begin, end in zip(bounds, bounds[1:]):
        chunk = sorted(order[begin:end])
        input_ids, attention_mask, positions, split = _subject_aligned(
            [problem.ids[r] for r in chunk], [subj[r] for r in chunk], pad_id(lm), lm.device)
        base, calls = capture_above(lm, layer, input_ids, attention_mask, split=split, position_ids=positions)
        rows = torch.tensor(chunk, dtype=torch.long, device=lm.device)
        member = torch.zeros_like(problem.row_req, dtype=torch.bool)
        member[rows] = True
        groups.append(_Group(rows=rows, base=base, calls=calls,
                             tgt=torch.nonzero(member[problem.tgt_row]).flatten(),
                             kl_req=torch.nonzero(member[problem.kl_row]).flatten(),
                             local=_local_index(rows, problem)))
    return groups


def compute_targets(lm, layer: int, requests, prefixes, config: TargetConfig | None = None, *,
                    batch_size: int = TARGET_BATCH_SIZE, paraphrases: list[list[str]] | None = None) -> TargetResult:
    """Optimise ``z_i = h_i + δ_i`` for every request of a batch at once (see module doc).

    All ``u`` requests share each step: their rewriting and KL prompts run in groups of at
    most ``batch_size`` rows sorted by their subject-to-end length, left-padded so every
    row's subject falls on one column (gradients accumulate over groups; one Adam step on
    ``δ (u, d_model)`` per step). Per group, one forward caches the keys and values of the
    columns before that column (an edit at the subject cannot change them), the states after
    block ``layer`` and the arguments of the blocks above; a step adds ``δ`` at the subject
    column and replays only blocks ``layer+1..N-1`` on the columns from it on, then the final
    norm and LM head at the positions a loss reads. A
    request whose loss drops below ``early_stop_loss`` keeps its ``δ`` and leaves the batch;
    the loop ends when every request has stopped or ``steps`` are spent. ``batch_size``
    trades memory and per-call overhead against replayed width; the result does not depend
    on it beyond float rounding. ``paraphrases`` (one list of prompt templates per request, all
    of one length; :func:`~rlsedit.locate.paraphrases.paraphrase_templates`) adds rewording
    rows to each request's rewriting prompts (:func:`~rlsedit.locate.tokens.prompt_texts`).
    """
    return _run_prepared(lm, layer, requests, prefixes, config, batch_size, _optimise, paraphrases)


def _run_prepared(lm, layer, requests, prefixes, config, batch_size, find, paraphrases=None) -> TargetResult:
    """Validate, build the token rows, and run ``find(lm, layer, requests, problem, config,
    batch_size)`` in the config's precision."""
    layer, requests, prefixes, config = _prepare(lm, layer, requests, prefixes, config, batch_size)
    if not requests:
        return _empty(lm)
    problem = _build_problem(lm, requests, prefixes, config, paraphrases)
    if config.dtype == "float32":
        return find(lm, layer, requests, problem, config, batch_size)
    # δ is found against the model in low precision, then added to the float32 state:
    # z = h + δ with h from the float32 model, so the residual the solver spreads, z − h, is δ
    # itself and carries no rounding of h.
    initial = hidden_at_subject(lm, layer, requests)
    with weights_in(lm, DTYPES[config.dtype]), _attention_for(lm, config.dtype):
        result = find(lm, layer, requests, problem, config, batch_size)
    return TargetResult(z=initial + result.delta.float(), initial=initial, losses=result.losses,
                        target_prob=result.target_prob, steps=result.steps)


def _optimise(lm, layer: int, requests: list[EditRequest], problem: _Problem, config: TargetConfig,
              batch_size: int) -> TargetResult:
    """The loop of :func:`compute_targets` on prepared token rows."""
    groups = _groups(lm, layer, problem, batch_size)
    initial = _initial_states(lm, layer, requests, problem, groups)
    return _adam(lm, layer, requests, problem, config, groups, initial)


def _initial_states(lm, layer: int, requests: list[EditRequest], problem: _Problem,
                    groups: list[_Group]) -> torch.Tensor:
    """``h (u, d_model)``: each request's state after block ``layer`` at its subject on the bare
    prompt, read from the groups' captured states when the bare prefix is among the prompts."""
    if problem.plain_row is None:
        return hidden_at_subject(lm, layer, requests)
    initial = torch.empty((len(requests), lm.d_model), dtype=torch.float32, device=lm.device)
    for g in groups:
        hit = torch.nonzero(torch.isin(problem.plain_row, g.rows)).flatten()   # requests
        local = torch.searchsorted(g.rows, problem.plain_row[hit])
        initial[hit] = g.base[local, 0].float()  # replay column 0 is the subject
    return initial


def _adam(lm, layer: int, requests: list[EditRequest], problem: _Problem, config: TargetConfig,
          groups: list[_Group], initial: torch.Tensor, *, start: torch.Tensor | None = None,
          active: torch.Tensor | None = None, keep_best: bool = False) -> TargetResult:
    """Adam on ``δ`` over prepared groups.

    ``start`` (``(u, d_model)``, default zeros) is where ``δ`` begins; its groups must then
    already hold their KL reference (taken at ``δ = 0``). ``active`` (default all) are the
    requests to optimise; the others keep ``start`` and are never replayed. With
    ``keep_best`` each request returns the ``δ`` of the lowest loss it was evaluated at
    (``start`` included) instead of the last one, so it never ends worse than it began.
    """
    u, P, device = len(requests), problem.n_prefixes, lm.device
    init_norm = initial.norm(dim=-1)                   # (u,) ‖h_i‖
    max_norm = config.clamp_norm_factor * init_norm    # (u,)

    if start is None:
        delta = torch.zeros((u, lm.d_model), dtype=torch.float32, device=device, requires_grad=True)
    else:
        if any(g.kl_ref is None for g in groups):
            raise ValueError("an Adam loop starting away from δ = 0 needs the groups' KL reference from δ = 0")
        delta = start.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=config.lr)
    final = delta.detach().clone()
    losses = torch.zeros(u, device=device)
    probs = torch.zeros(u, device=device)
    best = torch.full((u,), math.inf, device=device)
    steps_used = torch.zeros(u, dtype=torch.long, device=device)
    active = torch.ones(u, dtype=torch.bool, device=device) if active is None else active.clone()

    for step in range(config.steps):
        backward = step < config.steps - 1   # the last evaluation is never followed by a step
        optimizer.zero_grad(set_to_none=True)
        row_nll = torch.zeros(u * P, device=device)    # (1/T) Σ_t −log p(y_t) per rewriting row
        kl = torch.zeros(u, device=device)
        not_top1 = torch.zeros(u, device=device)        # target entries whose token is not the argmax
        groups = [g for g in groups if g.keep_active(active, problem)]
        for g in groups:
            with torch.set_grad_enabled(backward):
                tok_nll, kl_group, kl_logp, top1 = _replay(lm, problem, g, delta[problem.row_req[g.rows]])
                tok_nll, kl_group = tok_nll[0], kl_group[0]                              # (e,), (k,)
                if g.kl_ref is None:   # step 0 of a loop from δ = 0
                    g.kl_ref = kl_logp
                if backward:
                    # this group's share of Σ_i L_i: δ_i reaches only request i's rows
                    (tok_nll.sum() / P + config.kl_factor * kl_group.sum()).backward()
            row_nll.index_add_(0, problem.tgt_row[g.tgt], tok_nll.detach())
            not_top1.index_add_(0, problem.row_req[problem.tgt_row[g.tgt]], (~top1[0]).float())
            kl[g.kl_req] = kl_group.detach()
        req = torch.nonzero(active).flatten()
        with torch.enable_grad():
            size = _size(delta[req], init_norm[req], config)
            if backward:
                size.sum().backward()
        nll_rows = row_nll.view(u, P)
        nll = nll_rows.mean(dim=1)[req]
        loss = nll + config.kl_factor * kl[req] + size.detach()
        _check_finite(loss, requests, req, layer)
        kept = req
        if keep_best:
            better = loss < best[req]
            kept = req[better]
            best[kept] = loss[better]
        losses[kept] = loss if kept is req else loss[better]
        probs[kept] = torch.exp(-nll_rows).mean(dim=1)[kept]
        final[kept] = delta.detach()[kept]
        log.debug("layer %d step %d: mean loss %.4f (nll %.4f), mean p(target) %.4f, active %d/%d; losses %s",
                  layer, step, loss.mean().item(), nll.mean().item(), probs[req].mean().item(), req.numel(), u,
                  [round(v, 4) for v in loss.tolist()])
        stop = (loss < config.early_stop_loss) | (nll < config.early_stop_nll)
        if config.early_stop_top1:   # MPES: the target is the greedy continuation under every prompt
            stop |= not_top1[req] == 0
        active[req[stop]] = False
        if not backward or not active.any():
            break
        optimizer.step()
        with torch.no_grad():
            frozen = ~active
            delta[frozen] = final[frozen]  # Adam's momentum must not move a stopped request
            go = torch.nonzero(active).flatten()
            moving = delta[go]
            _clamp_(moving, max_norm[go])
            delta[go] = moving
        steps_used[active] += 1

    return TargetResult(z=initial + final, initial=initial, losses=losses, target_prob=probs, steps=steps_used)
