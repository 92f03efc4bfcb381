"""Batched, padded, no-grad scoring primitives that every evaluation suite uses (decoding:
:mod:`rlsedit.eval.decoding`).

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
* Position ids are rebuilt from the attention mask, ``pos_t = (Σ_{s≤t} mask_s) − 1``, so a
  padded row sees the positions an unpadded row would (left or right padding alike).
* The tests check padded against unpadded computations to 1e-5 (float32) and 1e-10 (float64).
* Rows are sorted by length before batching (less padding) and results are returned in the
  caller's order.
* The model is put in ``eval()`` mode for the call and its previous mode restored after.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import NumericalError
from ..locate.tokens import pad_left, pad_right, pad_token_id
from ..model.cache import cache_of, positions_from_mask
from .datafiles import EvalDataError


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


def check_length(model, length: int, what: str) -> None:
    """Refuse a row longer than the model's position table (``what`` names it in the error)."""
    limit = _max_positions(model)
    if limit is not None and length > limit:
        raise EvalDataError(f"{what} is {length} tokens, longer than the model's context of {limit} tokens")


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def float_logits(logits: torch.Tensor) -> torch.Tensor:
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
    return float_logits(out.logits[:, -keep:, :]), cache_of(out)


def batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    """``order`` in consecutive chunks of ``batch_size``."""
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size that is not a positive int."""
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
    check_batch_size(batch_size)
    tokenizer, model = lm.tokenizer, lm.model
    encoded: list[tuple[list[int], list[int]]] = []
    for row, (prompt, cont) in enumerate(zip(prompts, continuations)):
        p_ids, c_ids = encode_prompt(tokenizer, prompt), encode_continuation(tokenizer, cont)
        if not p_ids:
            raise EvalDataError(f"row {row}: prompt {prompt!r} has no tokens; nothing predicts the first target token")
        if not c_ids:
            raise EvalDataError(f"row {row}: continuation {cont!r} has no tokens")
        check_length(model, len(p_ids) + len(c_ids), f"row {row} (prompt + continuation)")
        encoded.append((p_ids, c_ids))

    results: list[ContinuationScore | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    with eval_mode(model):
        for rows in batches(order, batch_size):
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
    check_batch_size(batch_size)
    tokenizer, model = lm.tokenizer, lm.model
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for row, ids in enumerate(encoded):
        if not ids:
            raise EvalDataError(f"row {row}: prompt {prompts[row]!r} has no tokens")
        check_length(model, len(ids) + 1, f"row {row} (prompt + one token)")
    results: list[torch.Tensor | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    with eval_mode(model):
        for rows in batches(order, batch_size):
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
    check_length(lm.model, len(ids), "prompt")
    with eval_mode(lm.model):
        ids_t, mask = pad_left([ids], pad_token_id(lm.tokenizer))
        logits, _ = forward_last(lm.model, ids_t.to(lm.device), mask.to(lm.device), 1)
        logp = torch.log_softmax(logits[0, -1], dim=-1)
        values, indices = logp.topk(min(k, logp.numel()))
    return [
        TokenScore(token_id=int(i), text=lm.tokenizer.decode([int(i)]), logprob=float(v))
        for v, i in zip(values.tolist(), indices.tolist())
    ]
