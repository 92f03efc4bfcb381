"""Batched greedy and top-k decoding with a KV cache, shared by every generation metric and ``rlsedit ask``.

Everything here takes ``lm`` as :mod:`rlsedit.eval.scoring` does. Generation batches are
**left**-padded (new tokens are appended to every row at the same column); position ids are
rebuilt from the attention mask, ``pos_t = (Σ_{s≤t} mask_s) − 1``, so a padded row sees the
positions an unpadded row would. If a padded batch yields non-finite logits it is decoded again
row by row without padding. Rows are sorted by length before batching and texts come back in the
caller's order; the model is in ``eval()`` mode for the call.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ..errors import NumericalError
from ..locate.tokens import pad_left, pad_token_id
from ..model.cache import cache_kwarg, cache_of, positions_from_mask
from .datafiles import EvalDataError
from .scoring import batches, check_batch_size, check_length, encode_prompt, eval_mode, float_logits, forward_last

logger = logging.getLogger(__name__)


def eos_ids(lm) -> set[int]:
    """The end-of-sequence ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    for source in (getattr(lm.tokenizer, "eos_token_id", None),
                   getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to (excluding) the earliest stop string; and whether one was found."""
    cut = min((pos for pos in (text.find(s) for s in stop) if pos >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _NonFiniteLogits(Exception):
    """Internal: a decoding step produced NaN/inf logits for a live row."""


def decode_with_cache(lm, seqs: Sequence[Sequence[int]], pad: int, steps: int,
                      next_tokens: Callable[[torch.Tensor], list[int | None]]) -> None:
    """The KV-cache loop under every decoder here and in ``serve/``: one left-padded prefill of
    ``seqs``, then up to ``steps`` calls ``next_tokens(logits (B, V))`` with each row's logits at
    its last position; it returns each row's next token, or None for a finished row (fed a pad
    token whose output is never read). Ends when every row is finished or after ``steps`` calls."""
    model = lm.model
    ids, mask = pad_left([list(s) for s in seqs], pad)
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    logits, cache = forward_last(model, ids, mask, 1, use_cache=True)  # (B, 1, V)
    for step in range(steps):
        feed = next_tokens(logits[:, -1, :])
        if all(t is None for t in feed) or step == steps - 1:
            return
        column = torch.tensor([pad if t is None else t for t in feed], device=lm.device)[:, None]  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = positions_from_mask(mask)[:, -1:]  # pos_t = Σ mask − 1 at the new column
        out = model(input_ids=column, attention_mask=mask, position_ids=position,
                    use_cache=True, **{cache_kwarg(model): cache})
        logits, cache = float_logits(out.logits[:, -1:, :]), cache_of(out)


def _decode_batch(lm, seqs: list[list[int]], max_new_tokens: int, stop: Sequence[str], choose,
                  eos: set[int], pad: int) -> list[list[int]]:
    """Decode one left-padded batch; returns the new token ids of each row."""
    tokenizer = lm.tokenizer
    generated: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)

    def next_tokens(logits: torch.Tensor) -> list[int | None]:
        live = torch.tensor([not d for d in done], device=logits.device)
        if not bool(torch.isfinite(logits[live]).all()):
            raise _NonFiniteLogits()
        for b, tok in enumerate(choose(logits).tolist()):
            if done[b]:
                continue
            if tok in eos:
                done[b] = True
                continue
            generated[b].append(tok)
            if stop and cut_at_stop(tokenizer.decode(generated[b], skip_special_tokens=True), stop)[1]:
                done[b] = True
        return [None if done[b] else generated[b][-1] for b in range(len(seqs))]

    decode_with_cache(lm, seqs, pad, max_new_tokens, next_tokens)
    return generated


def _generate(
    lm,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str],
    batch_size: int,
    choose,
) -> list[str]:
    """Shared decoding loop; ``choose(logits (B, V)) -> (B,)`` picks the next tokens."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise EvalDataError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_batch_size(batch_size)
    if any(not s for s in stop):
        raise EvalDataError("stop strings must be non-empty")
    tokenizer, model = lm.tokenizer, lm.model
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for row, ids in enumerate(encoded):
        if not ids:
            raise EvalDataError(f"prompt {row} ({prompts[row]!r}) has no tokens")
        check_length(model, len(ids) + max_new_tokens, f"prompt {row} plus {max_new_tokens} new tokens")
    eos, pad = eos_ids(lm), pad_token_id(tokenizer)
    texts: list[str] = [""] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    with eval_mode(model):
        for rows in batches(order, batch_size):
            try:
                generated = _decode_batch(lm, [encoded[i] for i in rows], max_new_tokens, stop, choose, eos, pad)
            except _NonFiniteLogits:
                logger.warning("padded batch gave non-finite logits; decoding its %d rows one by one", len(rows))
                generated = []
                for i in rows:
                    try:
                        generated += _decode_batch(lm, [encoded[i]], max_new_tokens, stop, choose, eos, pad)
                    except _NonFiniteLogits:
                        raise NumericalError(
                            f"the model produced non-finite logits while decoding prompt {i} "
                            f"({prompts[i][:60]!r}); its weights may be broken"
                        ) from None
            for b, i in enumerate(rows):
                texts[i] = cut_at_stop(tokenizer.decode(generated[b], skip_special_tokens=True), stop)[0]
    return texts


def greedy_generate(
    lm, prompts: Sequence[str], max_new_tokens: int, *, stop: Sequence[str] = (), batch_size: int = 8
) -> list[str]:
    """Greedy continuations ``x_{t+1} = argmax p(· | x_≤t)`` of each prompt, batched.

    Decoding stops at an end-of-sequence token, after ``max_new_tokens`` tokens, or when the
    decoded text contains one of ``stop``; the returned text ends before the first stop string.
    """
    return _generate(lm, prompts, max_new_tokens, tuple(stop), batch_size, lambda logits: logits.argmax(-1))


def sample_generate(
    lm,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    top_k: int = 5,
    seed: int = 0,
    stop: Sequence[str] = (),
    batch_size: int = 8,
) -> list[str]:
    """Top-k sampling (ROME's ``generate_fast`` uses ``top_k=5``): sample ``x_{t+1}`` from
    ``p(· | x_≤t)`` renormalised over its ``top_k`` largest entries.

    Sampling draws from a CPU generator seeded with ``seed``, so a run is repeatable on any
    device for a fixed batch composition (batching changes logits in the last bits, which
    can flip a draw).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise EvalDataError(f"top_k must be a positive integer, got {top_k!r}")
    generator = torch.Generator().manual_seed(seed)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (B, k)
        probs = torch.softmax(values.double().cpu(), dim=-1)
        pick = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        return indices.cpu().gather(1, pick)[:, 0]

    return _generate(lm, prompts, max_new_tokens, tuple(stop), batch_size, choose)
