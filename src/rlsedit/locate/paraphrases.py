"""Rewordings of an edit's prompt, written by the model itself, for its value target to train on.

The value target ``δ`` (:mod:`rlsedit.locate.targets`) is fitted under the edit's own prompt
behind a few context prefixes, so it learns to make the new object follow *that* wording. Asked
another way ("The native language of X is" for "X spoke the language"), the subject sits in
another place and the last token reads it through other attention, and the edit is said less
often (issue #29: 95 % on the edit prompt, 66 % on true paraphrases). Here the model is asked,
few-shot, to reword each prompt; the rewordings that keep the subject and ask for the same kind of
answer become extra prompts of the target's loss (``paraphrases=`` of
:func:`~rlsedit.locate.targets.compute_targets`).

A rewording is kept only if it

* holds the subject exactly once, is not the prompt itself, and names neither the new nor the
  old object;
* reads as the start of a statement (it does not end a sentence);
* asks for the same kind of answer: the model's next-token distribution after it overlaps the
  one after the prompt, Bhattacharyya coefficient ``Σ_v √(p_v q_v) ≥ min_overlap``. "X was born
  in" written for "X spoke the language" asks for a place, not a language, and is dropped.

Of those, the ``count`` with the largest overlap are used. A request with fewer gets its own
prompt in the free places (:func:`paraphrase_templates` always returns ``count`` per request),
so every request has the same number of loss rows. Nothing here reads evaluation data: the
examples in :data:`REWORD_EXAMPLES` are written for this module with made-up names.

Sampling is top-k (k = :data:`~rlsedit.locate.prefixes.TOP_K`, as the context prefixes) from a
local, seeded :class:`torch.Generator`, batched over requests with one key/value cache: the
instruction and examples run once and are shared by every row.
"""

from __future__ import annotations

import re

import torch

from ..errors import InvalidRequestError
from ..model.cache import cache_kwarg, cache_of, positions_from_mask
from ..requests import SUBJECT_SLOT, EditRequest
from .prefixes import TOP_K, clean_sampled_text
from .tokens import max_positions, pad_id, pad_left, request_template

REWORD_INSTRUCTION = ("Rewrite each sentence start in other words. Keep the name exactly as it is. "
                      "The missing last word must still come right after it.")

REWORD_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("The mother tongue of Jean Dupont is", "Jean Dupont's native language is"),
    ("Velora Z3 is produced by", "The maker of Velora Z3 is"),
    ("Lake Miraval is located in the continent of", "Lake Miraval lies on the continent of"),
    ("Anna Berglund works in the field of", "The field Anna Berglund works in is"),
    ("Tomas Lindqvist holds a citizenship from", "Tomas Lindqvist is a citizen of"),
)
"""Hand-written (prompt, rewording) pairs of the few-shot prompt; made-up names only."""

_SENTENCE_END = re.compile(r"[.!?]$")


def _head() -> str:
    lines = [REWORD_INSTRUCTION]
    for prompt, reworded in REWORD_EXAMPLES:
        lines += [f"Start: {prompt}", f"Rewrite: {reworded}"]
    return "\n".join(lines) + "\n"


def _query(text: str) -> str:
    return f"Start: {text}\nRewrite:"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _mentions(text: str, name: str | None) -> bool:
    if not name or not name.strip():
        return False
    return re.search(r"(?<!\w)" + re.escape(name.strip().casefold()) + r"(?!\w)", text.casefold()) is not None


def acceptable(candidate: str, request: EditRequest) -> bool:
    """Whether ``candidate`` (a full prompt) may stand for ``request``'s prompt: the subject once,
    not the prompt itself, neither object named, not the end of a sentence."""
    if not candidate or candidate.count(request.subject) != 1 or SUBJECT_SLOT in candidate:
        return False
    if _norm(candidate) == _norm(request.text) or _SENTENCE_END.search(candidate):
        return False
    return not (_mentions(candidate, request.target_new) or _mentions(candidate, request.target_true))


def _newline_ids(lm) -> torch.Tensor:
    """Ids of the tokens whose text holds a line break (a rewording is one line), memoised."""
    key = ("newline_ids",)
    if key not in lm.cache:
        tokenizer = lm.tokenizer
        ids = [i for t, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([t])]
        lm.cache[key] = torch.tensor(sorted(ids), dtype=torch.long, device=lm.device)
    return lm.cache[key]


def _query_logits(lm, requests: list[EditRequest], new_tokens: int = 0):
    """The next-token logits ``(u, V)`` after each request's few-shot query, with the cache,
    mask and last positions to continue from.

    The head (instruction and examples) runs once; its cache is repeated for every request and
    the queries follow it left-padded *between* head and query: the mask hides the gap and the
    positions count only real tokens, so each row computes head + query as one text.
    """
    tokenizer, device = lm.tokenizer, lm.device
    model, key = lm.model, cache_kwarg(lm.model)
    head = tokenizer(_head(), add_special_tokens=True, return_tensors="pt")["input_ids"].to(device)
    queries = [tokenizer(_query(r.text), add_special_tokens=False)["input_ids"] for r in requests]
    u, width, H = len(requests), max(len(q) for q in queries), head.shape[1]
    # a sliding window counts cache columns, gap included: within it the gap changes nothing
    window = getattr(lm.model.config.get_text_config(), "sliding_window", None)
    for limit, what in ((max_positions(lm), "context"), (window, "sliding attention window")):
        if limit and H + width + new_tokens > limit:
            raise InvalidRequestError(
                f"the rewording prompt needs {H + width + new_tokens} positions, more than the model's {what} "
                f"of {limit}; set paraphrase_count to 0 for this model")
    rows, query_mask = pad_left(queries, pad_id(lm), device)
    mask = torch.cat([torch.ones((u, H), dtype=torch.long, device=device), query_mask], dim=1)
    positions = positions_from_mask(mask)
    with torch.no_grad():
        cache = cache_of(model(input_ids=head, use_cache=True, logits_to_keep=1))
        cache.batch_repeat_interleave(u)
        out = model(input_ids=rows, attention_mask=mask, position_ids=positions[:, H:],
                    use_cache=True, logits_to_keep=1, **{key: cache})
    return out.logits[:, -1].float(), cache_of(out), mask, positions[:, -1]


def _sample_rewordings(lm, requests: list[EditRequest], samples: int, new_tokens: int,
                       generator: torch.Generator) -> list[list[str]]:
    """``samples`` top-k-sampled first lines after each request's few-shot query."""
    tokenizer, device, pad = lm.tokenizer, lm.device, pad_id(lm)
    model, key = lm.model, cache_kwarg(lm.model)
    special = torch.tensor(sorted(tokenizer.all_special_ids), device=device)
    newline = _newline_ids(lm)
    u = len(requests)
    logits, cache, mask, position = _query_logits(lm, requests, new_tokens)
    cache.batch_repeat_interleave(samples)
    logits = logits.repeat_interleave(samples, dim=0)                     # (u·S, V)
    mask = mask.repeat_interleave(samples, dim=0)
    position = position.repeat_interleave(samples, dim=0)
    picked = torch.full((u * samples, new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(u * samples, dtype=torch.bool, device=device)
    with torch.no_grad():
        for step in range(new_tokens):
            top = torch.topk(logits.float(), TOP_K, dim=-1)
            choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
            token = top.indices.gather(1, choice).squeeze(1)                 # (u·S,)
            done |= torch.isin(token, special) | torch.isin(token, newline)
            picked[:, step] = torch.where(done, pad, token)
            if bool(done.all()) or step == new_tokens - 1:
                break
            # finished rows are fed their last token; what they produce is never read
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position.unsqueeze(1),
                        use_cache=True, logits_to_keep=1, **{key: cache})
            cache, logits = cache_of(out), out.logits[:, -1]
    texts = []
    for row in picked.tolist():
        kept = [t for t in row if t != pad]
        texts.append(clean_sampled_text(tokenizer.decode(kept, skip_special_tokens=True)))
    return [texts[i * samples:(i + 1) * samples] for i in range(u)]


def _next_token_probs(lm, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """``(n, V)`` next-token distributions after each text (its special tokens added)."""
    out = []
    tokenizer = lm.tokenizer
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in chunk]
            input_ids, mask = pad_left(ids, pad_id(lm), lm.device)  # every row's last token last
            logits = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                              use_cache=False, logits_to_keep=1).logits[:, -1]
            out.append(torch.softmax(logits.float(), dim=-1))
    return torch.cat(out)


def paraphrase_templates(lm, requests: list[EditRequest], count: int, *, samples: int = 6,
                         new_tokens: int = 16, min_overlap: float = 0.3, seed: int = 0) -> list[list[str]]:
    """``count`` prompt templates (``"{}"`` for the subject) per request: the model's best
    rewordings of its prompt (module doc), its own template in the places left over.

    Args:
        lm: the loaded model (as it is now: a stream's later batches are reworded by the edited
            model).
        requests: the batch.
        count: templates per request (0 gives empty lists).
        samples: rewordings sampled per request, before the checks.
        new_tokens: the longest rewording, in tokens.
        min_overlap: the least Bhattacharyya overlap of next-token distributions with the prompt's.
        seed: seed of the local sampling generator (the same batch on the same weights gets the
            same templates).
    """
    for name, value, low in (("count", count, 0), ("samples", samples, 1), ("new_tokens", new_tokens, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= float(min_overlap) <= 1.0:
        raise InvalidRequestError(f"min_overlap must be within [0, 1], got {min_overlap!r}")
    own = [request_template(r) for r in requests]  # validates every subject first
    if count == 0 or not requests:
        return [[] for _ in requests]
    generator = torch.Generator(device=lm.device)
    generator.manual_seed(seed)
    sampled = _sample_rewordings(lm, list(requests), samples, new_tokens, generator)
    candidates = [list(dict.fromkeys(c for c in texts if acceptable(c, r))) for r, texts in zip(requests, sampled)]
    flat = [c for cs in candidates for c in cs]
    result = []
    if flat:
        probs = _next_token_probs(lm, [r.text for r in requests] + flat)
        overlap = (probs[len(requests):].sqrt() @ probs[:len(requests)].sqrt().T)  # (candidates, u)
    at = 0
    for i, (request, cs) in enumerate(zip(requests, candidates)):
        scored = [(float(overlap[at + j, i]), c) for j, c in enumerate(cs)]
        at += len(cs)
        best = [c for s, c in sorted(scored, key=lambda x: -x[0]) if s >= min_overlap][:count]
        templates = [c.replace(request.subject, SUBJECT_SLOT, 1) for c in best]
        result.append(templates + [own[i]] * (count - len(templates)))
    return result
