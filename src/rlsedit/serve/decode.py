"""Decode a batch of rows, each with its own sampling, in shared forward passes.

The loop is :func:`rlsedit.eval.decoding.decode_with_cache`, the one under
:func:`~rlsedit.eval.decoding.greedy_generate` (which ``rlsedit ask`` uses): left padding,
position ids from the mask (``pos_t = (Σ_{s≤t} mask_s) − 1``), a KV cache, finished rows fed a
pad token whose output is never read, end-of-sequence tokens never emitted, and the text cut
before the first stop string. A row decoded alone therefore runs exactly ``greedy_generate``'s computation and
yields its tokens; in a padded batch the logits may differ from it in the last bits.

What is added: per-row ``max_tokens``, stop strings, temperature / nucleus (top-p) sampling
with a per-row seeded generator, a per-step callback (streaming), and cancellation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import NumericalError
from ..eval.decoding import cut_at_stop, decode_with_cache, eos_ids
from ..eval.scoring import eval_mode
from ..locate.tokens import pad_token_id


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. ``temperature == 0`` is greedy (argmax)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Row:
    """One sequence to continue; ``tokens`` and ``finish_reason`` are filled by :func:`decode_rows`.

    ``on_step(row)`` is called after every step that changed the row (streaming); setting
    ``cancelled`` stops the row at the next step (its client went away).
    """

    prompt_ids: list[int]
    sampling: Sampling
    on_step: Callable[["Row"], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    cancelled: bool = False
    text: str = ""  # the decoded text, cut before the first stop string
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.sampling.temperature > 0:
            seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def choose(row: Row, logits: torch.Tensor) -> int:
    """The next token of ``row`` from its logits ``(V,)``.

    Greedy: ``argmax``. Sampling: ``p = softmax(logits / T)`` restricted to the smallest set of
    most likely tokens whose mass reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020),
    renormalised, drawn from the row's CPU generator (repeatable for a seed on any device).
    """
    s = row.sampling
    if s.temperature == 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits.double().cpu() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < s.top_p  # mass before a token below top_p: keep it
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        pick = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=row.generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def decode_rows(lm, rows: Sequence[Row], decode_text: Callable[[list[int]], str]) -> None:
    """Continue every row in one left-padded batch with a KV cache (see the module docstring).

    ``decode_text(ids)`` turns token ids into text (the caller serialises tokenizer use).
    Raises :class:`~rlsedit.errors.NumericalError` when a live row's logits are not finite.
    """
    eos, pad = eos_ids(lm), pad_token_id(lm.tokenizer)
    rows = list(rows)

    def next_tokens(logits: torch.Tensor) -> list[int | None]:
        for b, row in enumerate(rows):
            if row.done:
                continue
            if row.cancelled:
                row.finish_reason = "cancelled"
                continue
            if not bool(torch.isfinite(logits[b]).all()):
                raise NumericalError("the model produced non-finite logits; its weights may be broken")
            tok = choose(row, logits[b])
            if tok in eos:
                row.finish_reason = "stop"
            else:
                row.tokens.append(tok)
                found = False
                if row.sampling.stop or row.on_step is not None:  # else the text is decoded once, at the end
                    row.text, found = cut_at_stop(decode_text(row.tokens), row.sampling.stop)
                if found:
                    row.finish_reason = "stop"
                elif len(row.tokens) >= row.sampling.max_tokens:
                    row.finish_reason = "length"
            if row.on_step is not None:
                row.on_step(row)
        return [None if row.done else row.tokens[-1] for row in rows]

    with eval_mode(lm.model):
        decode_with_cache(lm, [r.prompt_ids for r in rows], pad, max(r.sampling.max_tokens for r in rows),
                          next_tokens)
    for row in rows:
        row.text = cut_at_stop(decode_text(row.tokens), row.sampling.stop)[0]
        if row.finish_reason is None:
            row.finish_reason = "length"
