"""Batched, padded, no-grad scoring and decoding primitives that every evaluation suite uses.

Everything here takes ``lm``: any object with ``model`` (a transformers causal LM),
``tokenizer`` (a transformers tokenizer) and ``device`` (a :class:`torch.device`).

Conventions
-----------
* A prompt is tokenized with the tokenizer's special tokens (BOS where the tokenizer adds
  one); a continuation is tokenized on its own without special tokens, and the model sees
  ``prompt_ids + continuation_ids``. Callers pass targets through
  :func:`rlsedit.requests.target_text` (one leading space) so the boundary is a word boundary.
* Scoring batches are **right**-padded: real tokens keep their natural positions and every
  padded query still attends to the real tokens before it, so no softmax row is fully
  masked (a fully masked row is NaN in some attention kernels, e.g. eager attention on a
  float64 model, and a NaN value poisons other rows through ``0 · NaN``). Only the logits
  from the earliest continuation position on are computed (``logits_to_keep``).
* Generation batches are **left**-padded (new tokens are appended to every row at the same
  column). Position ids are rebuilt from the attention mask, ``pos_t = (Σ_{s≤t} mask_s) − 1``,
  so a padded row sees the positions an unpadded row would. If a padded batch yields
  non-finite logits it is decoded again row by row without padding.
* The tests check padded against unpadded computations to 1e-5 (float32) and 1e-10 (float64).
* Rows are sorted by length before batching (less padding) and results are returned in the
  caller's order.
* The model is put in ``eval()`` mode for the call and its previous mode restored after.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import NumericalError
from ..locate.tokens import pad_left, pad_right, pad_token_id
from ..model.cache import cache_kwarg, cache_of, positions_from_mask
from .datafiles import EvalDataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContinuationScore:
    """Teacher-forced scores of one continuation after its prompt.

    Attributes:
        token_ids: the continuation's tokens ``c_1..c_n``.
        logprobs: ``(n,)`` ``log p(c_j | prompt, c_<j)`` (float32, or float64 for a float64 model).
        argmax_ids: ``argmax_v p(v | prompt, c_<j)`` at each of the ``n`` positions.
    """

    token_ids: tuple[int, ...]
    logprobs: torch.Tensor
    argmax_ids: tuple[int, ...]

    @property
    def mean_nll(self) -> float:
        """``−(1/n) Σ_j log p(c_j | …)``: ROME's per-token negative log-likelihood."""
        return float(-self.logprobs.mean())

    @property
    def token_accuracy(self) -> float:
        """``(1/n) Σ_j [argmax_j = c_j]``: MEND/EasyEdit's teacher-forced token accuracy."""
        hits = sum(a == t for a, t in zip(self.argmax_ids, self.token_ids))
        return hits / len(self.token_ids)

    @property
    def all_correct(self) -> bool:
        """Every position's argmax is the target token (= greedy decoding yields it)."""
        return self.argmax_ids == self.token_ids


@dataclass(frozen=True)
class TokenScore:
    """One candidate next token: its id, its text and ``log p(token | prompt)``."""

    token_id: int
    text: str
    logprob: float


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` for the block; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's special tokens (BOS where it adds one)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of a continuation, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _max_positions(model) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _check_length(model, length: int, what: str) -> None:
    limit = _max_positions(model)
    if limit is not None and length > limit:
        raise EvalDataError(f"{what} is {length} tokens, longer than the model's context of {limit} tokens")


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision logits to float32 before log_softmax; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def forward_last(model, ids: torch.Tensor, mask: torch.Tensor, keep: int, **extra) -> tuple[torch.Tensor, object]:
    """One forward pass of a padded batch; logits of the last ``keep`` positions.

    Position ids come from the mask (:func:`positions_from_mask`), which is correct for left
    and right padding alike. Returns ``(logits (B, keep, V), cache)``.
    """
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), **extra)
    if _accepts_logits_to_keep(model):
        out = model(**kwargs, logits_to_keep=keep)
    else:
        out = model(**kwargs)
    return _float_logits(out.logits[:, -keep:, :]), cache_of(out)


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise EvalDataError(f"batch_size must be a positive integer, got {batch_size!r}")


def score_continuations(
    lm, prompts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 16
) -> list[ContinuationScore]:
    """Teacher-forced log-probabilities and argmaxes of each continuation after its prompt.

    For prompt tokens ``p`` and continuation tokens ``c_1..c_n``:
    ``logprobs_j = log softmax(f(p, c_<j))[c_j]`` and ``argmax_j = argmax f(p, c_<j)``,
    computed in right-padded batches of ``batch_size`` rows. A non-finite log-probability
    (only a broken model produces one) raises :class:`~rlsedit.errors.NumericalError`.
    """
    if len(prompts) != len(continuations):
        raise EvalDataError(f"{len(prompts)} prompts but {len(continuations)} continuations; pass one of each per row")
    _check_batch_size(batch_size)
    tokenizer, model = lm.tokenizer, lm.model
    encoded: list[tuple[list[int], list[int]]] = []
    for row, (prompt, cont) in enumerate(zip(prompts, continuations)):
        p_ids, c_ids = encode_prompt(tokenizer, prompt), encode_continuation(tokenizer, cont)
        if not p_ids:
            raise EvalDataError(f"row {row}: prompt {prompt!r} has no tokens; nothing predicts the first target token")
        if not c_ids:
            raise EvalDataError(f"row {row}: continuation {cont!r} has no tokens")
        _check_length(model, len(p_ids) + len(c_ids), f"row {row} (prompt + continuation)")
        encoded.append((p_ids, c_ids))

    results: list[ContinuationScore | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    with eval_mode(model):
        for rows in _batches(order, batch_size):
            ids, mask = pad_right([encoded[i][0] + encoded[i][1] for i in rows], pad_token_id(tokenizer))
            width = ids.shape[1]
            # column t predicts token t+1, so c_1 of row i is predicted at column len(p_i) - 1
            first = min(len(encoded[i][0]) - 1 for i in rows)
            logits, _ = forward_last(model, ids.to(lm.device), mask.to(lm.device), width - first)
            logp = torch.log_softmax(logits, dim=-1)  # (B, width - first, V)
            for b, i in enumerate(rows):
                p_ids, c_ids = encoded[i]
                start = len(p_ids) - 1 - first
                row_logp = logp[b, start:start + len(c_ids), :]  # (n, V): predictions of c_1..c_n
                target = torch.tensor(c_ids, device=row_logp.device)
                picked = row_logp.gather(1, target[:, None])[:, 0]
                if not bool(torch.isfinite(picked).all()):
                    raise NumericalError(
                        f"the model gave non-finite log-probabilities for row {i} "
                        f"({prompts[i][:60]!r} + {continuations[i][:30]!r}); its weights may be broken"
                    )
                results[i] = ContinuationScore(
                    token_ids=tuple(c_ids),
                    logprobs=picked.detach().cpu(),
                    argmax_ids=tuple(int(t) for t in row_logp.argmax(-1).tolist()),
                )
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def continuation_logprobs(
    lm, prompts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 16
) -> list[torch.Tensor]:
    """Per-token ``log p(c_j | prompt, c_<j)`` of each continuation: a list of ``(n_i,)`` tensors."""
    return [s.logprobs for s in score_continuations(lm, prompts, continuations, batch_size=batch_size)]


def next_token_logprobs(
    lm, prompts: Sequence[str], candidates: Sequence[Sequence[int]], *, batch_size: int = 16
) -> list[torch.Tensor]:
    """``log p(v | prompt)`` of the candidate token ids ``v`` of each prompt: one forward pass
    per prompt however many candidates it has. Returns a list of ``(len(candidates_i),)`` tensors.

    For a one-token continuation this equals :func:`continuation_logprobs`; scored multiple
    choice with one-token answers (" A".." D", " True"/" False") uses it to avoid re-running
    the prompt once per choice.
    """
    if len(prompts) != len(candidates):
        raise EvalDataError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    _check_batch_size(batch_size)
    tokenizer, model = lm.tokenizer, lm.model
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for row, ids in enumerate(encoded):
        if not ids:
            raise EvalDataError(f"row {row}: prompt {prompts[row]!r} has no tokens")
        _check_length(model, len(ids) + 1, f"row {row} (prompt + one token)")
    results: list[torch.Tensor | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    with eval_mode(model):
        for rows in _batches(order, batch_size):
            ids, mask = pad_right([encoded[i] for i in rows], pad_token_id(tokenizer))
            first = min(len(encoded[i]) for i in rows) - 1  # earliest last-prompt column
            logits, _ = forward_last(model, ids.to(lm.device), mask.to(lm.device), ids.shape[1] - first)
            for b, i in enumerate(rows):
                logp = torch.log_softmax(logits[b, len(encoded[i]) - 1 - first], dim=-1)  # (V,)
                wanted = torch.tensor(list(candidates[i]), dtype=torch.long, device=logp.device)
                results[i] = logp[wanted].detach().cpu()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def next_token_topk(lm, prompt: str, k: int = 10) -> list[TokenScore]:
    """The ``k`` most likely next tokens after ``prompt``, most likely first."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise EvalDataError(f"k must be a positive integer, got {k!r}")
    ids = encode_prompt(lm.tokenizer, prompt)
    if not ids:
        raise EvalDataError(f"prompt {prompt!r} has no tokens")
    _check_length(lm.model, len(ids), "prompt")
    with eval_mode(lm.model):
        ids_t, mask = pad_left([ids], pad_token_id(lm.tokenizer))
        logits, _ = forward_last(lm.model, ids_t.to(lm.device), mask.to(lm.device), 1)
        logp = torch.log_softmax(logits[0, -1], dim=-1)
        values, indices = logp.topk(min(k, logp.numel()))
    return [
        TokenScore(token_id=int(i), text=lm.tokenizer.decode([int(i)]), logprob=float(v))
        for v, i in zip(values.tolist(), indices.tolist())
    ]


def _eos_ids(lm) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.tokenizer, "eos_token_id", None),
                   getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to (excluding) the earliest stop string; and whether one was found."""
    cut = min((pos for pos in (text.find(s) for s in stop) if pos >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _NonFiniteLogits(Exception):
    """Internal: a decoding step produced NaN/inf logits for a live row."""


def _decode_batch(lm, seqs: list[list[int]], max_new_tokens: int, stop: Sequence[str], choose,
                  eos: set[int], pad: int) -> list[list[int]]:
    """Decode one left-padded batch with a KV cache; returns the new token ids of each row."""
    tokenizer, model = lm.tokenizer, lm.model
    ids, mask = pad_left(seqs, pad)
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    logits, cache = forward_last(model, ids, mask, 1, use_cache=True)  # (B, 1, V)
    generated: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    for step in range(max_new_tokens):
        live = torch.tensor([not d for d in done], device=logits.device)
        if not bool(torch.isfinite(logits[live, -1, :]).all()):
            raise _NonFiniteLogits()
        next_ids = choose(logits[:, -1, :])  # (B,)
        for b, tok in enumerate(next_ids.tolist()):
            if done[b]:
                continue
            if tok in eos:
                done[b] = True
                continue
            generated[b].append(tok)
            if stop and _cut_at_stop(tokenizer.decode(generated[b], skip_special_tokens=True), stop)[1]:
                done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break
        # finished rows keep decoding a pad token whose output is never read
        feed = torch.tensor([pad if done[b] else generated[b][-1] for b in range(len(seqs))],
                            device=lm.device)[:, None]  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = positions_from_mask(mask)[:, -1:]  # pos_t = Σ mask − 1 at the new column
        out = model(input_ids=feed, attention_mask=mask, position_ids=position,
                    use_cache=True, **{cache_kwarg(model): cache})
        logits, cache = _float_logits(out.logits[:, -1:, :]), cache_of(out)
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
    _check_batch_size(batch_size)
    if any(not s for s in stop):
        raise EvalDataError("stop strings must be non-empty")
    tokenizer, model = lm.tokenizer, lm.model
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for row, ids in enumerate(encoded):
        if not ids:
            raise EvalDataError(f"prompt {row} ({prompts[row]!r}) has no tokens")
        _check_length(model, len(ids) + max_new_tokens, f"prompt {row} plus {max_new_tokens} new tokens")
    eos, pad = _eos_ids(lm), pad_token_id(tokenizer)
    texts: list[str] = [""] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    with eval_mode(model):
        for rows in _batches(order, batch_size):
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
                texts[i] = _cut_at_stop(tokenizer.decode(generated[b], skip_special_tokens=True), stop)[0]
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
