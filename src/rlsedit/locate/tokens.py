"""Where the subject sits in a tokenized prompt, and right-padded batches of token ids.

Every locate function reads the model at the *subject's last token*: the last token whose
character span overlaps the subject's characters in the text (tokenizer offset mapping).
Texts are built from templates so the subject's character span is known exactly, never
searched for after the fact:

    text = template.replace("{}", subject),  subject occupies text[start:end]
    start = template.index("{}"),            end = start + len(subject)

Batches are padded on the right, so every real token keeps position ids ``0..n-1`` and a
causal model's outputs at real tokens do not depend on the padding.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InvalidRequestError, UnsupportedError
from ..requests import SUBJECT_SLOT, EditRequest


@dataclass(frozen=True)
class SubjectText:
    """One text to run, with the subject's character span and who asked for it.

    Attributes:
        text: the full text (prefix, prompt and subject filled in).
        start, end: ``text[start:end]`` is the subject.
        owner: names the request in error messages.
    """

    text: str
    start: int
    end: int
    owner: str


def request_template(request: EditRequest) -> str:
    """The request's prompt with exactly one ``{}`` where the subject goes.

    A prompt without a slot must contain the subject verbatim (its first occurrence is
    used); anything else raises :class:`InvalidRequestError` naming the request.
    """
    name = f"edit {request.id!r}"
    if not isinstance(request.subject, str) or not request.subject:
        raise InvalidRequestError(f"{name}: the subject is empty; keys are read at its last token")
    slots = request.prompt.count(SUBJECT_SLOT)
    if slots == 1:
        return request.prompt
    if slots > 1:
        raise InvalidRequestError(f"{name}: prompt {request.prompt!r} has {slots} '{{}}' slots, expected one")
    pos = request.prompt.find(request.subject)
    if pos < 0:
        raise InvalidRequestError(
            f"{name}: subject {request.subject!r} does not occur in prompt {request.prompt!r}; "
            "put '{}' where the subject goes"
        )
    return request.prompt[:pos] + SUBJECT_SLOT + request.prompt[pos + len(request.subject):]


def check_prefixes(prefixes) -> list[str]:
    """Validate context prefixes: a non-empty list of strings, each with exactly one ``{}``."""
    if isinstance(prefixes, str):
        raise InvalidRequestError("prefixes must be a list of strings, got a single string")
    prefixes = list(prefixes)
    if not prefixes:
        raise InvalidRequestError("prefixes is empty; pass at least ['{}'] (the bare prompt)")
    for prefix in prefixes:
        if not isinstance(prefix, str) or prefix.count(SUBJECT_SLOT) != 1:
            raise InvalidRequestError(
                f"context prefix {prefix!r} must be a string with exactly one '{{}}' where the prompt goes"
            )
    return prefixes


def fill_subject(template: str, subject: str, owner: str) -> SubjectText:
    """``template`` (one ``{}``) with the subject filled in, and the subject's span."""
    start = template.index(SUBJECT_SLOT)
    text = template[:start] + subject + template[start + len(SUBJECT_SLOT):]
    return SubjectText(text=text, start=start, end=start + len(subject), owner=owner)


def prompt_texts(requests: list[EditRequest], prefixes: list[str],
                 paraphrases: list[list[str]] | None = None) -> list[SubjectText]:
    """``prefix.replace("{}", request.text)`` for every request × prefix, request-major, then
    the request's extra templates (``paraphrases[i]``: prompt templates with ``"{}"`` for the
    subject, the same number for every request).

    Row ``i * P + p`` (``P = len(prefixes) + k``) is request ``i`` under prefix ``p`` for
    ``p < len(prefixes)``; row ``i * P + len(prefixes) + j`` is its template ``j`` behind the
    prefix ``prefixes[(1 + j) % len(prefixes)]`` (the generated prefixes in turn after the bare
    one, so the rewordings also meet other contexts).
    """
    extra = check_paraphrases(requests, paraphrases)
    out = []
    for request, templates in zip(requests, extra):
        owner = f"edit {request.id!r}"
        rows = [(prefix, request_template(request)) for prefix in prefixes]
        rows += [(prefixes[(1 + j) % len(prefixes)], t) for j, t in enumerate(templates)]
        for prefix, template in rows:
            # The prefix's "{}" takes the prompt template, whose "{}" then takes the subject.
            slot = prefix.index(SUBJECT_SLOT)
            combined = prefix[:slot] + template + prefix[slot + len(SUBJECT_SLOT):]
            out.append(fill_subject(combined, request.subject, owner))
    return out


def check_paraphrases(requests: list[EditRequest], paraphrases: list[list[str]] | None) -> list[list[str]]:
    """Validate per-request extra templates: one list per request, all of one length, each a
    string with exactly one ``{}``. None gives empty lists."""
    if paraphrases is None:
        return [[] for _ in requests]
    paraphrases = [list(t) for t in paraphrases]
    if len(paraphrases) != len(requests):
        raise InvalidRequestError(f"paraphrases: {len(paraphrases)} lists for {len(requests)} requests")
    if len({len(t) for t in paraphrases}) > 1:
        raise InvalidRequestError("paraphrases: every request needs the same number of templates")
    for request, templates in zip(requests, paraphrases):
        for t in templates:
            if not isinstance(t, str) or t.count(SUBJECT_SLOT) != 1:
                raise InvalidRequestError(
                    f"edit {request.id!r}: paraphrase template {t!r} must be a string with exactly one '{{}}'")
    return paraphrases


def max_positions(lm) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings``), if declared."""
    config = lm.model.config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def encode_at_subject(lm, items: list[SubjectText]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text (with the tokenizer's special tokens) and the index of the
    subject's last token in it.

    Raises :class:`InvalidRequestError` when no token covers the subject or a text is
    longer than the model's context.
    """
    tokenizer = lm.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets; "
            "rlsedit needs a fast (Rust) tokenizer to find the subject's tokens"
        )
    if not items:
        return [], []
    enc = tokenizer([item.text for item in items], add_special_tokens=True, return_offsets_mapping=True)
    limit = max_positions(lm)
    positions = []
    for item, ids, offsets in zip(items, enc["input_ids"], enc["offset_mapping"]):
        # Last token whose characters [a, b) overlap the subject's [start, end); special
        # tokens have empty spans (a == b) and never match.
        last = -1
        for index, (a, b) in enumerate(offsets):
            if b > a and a < item.end and b > item.start:
                last = index
        if last < 0:
            raise InvalidRequestError(f"{item.owner}: no token covers the subject in {item.text!r}")
        if limit is not None and len(ids) > limit:
            raise InvalidRequestError(
                f"{item.owner}: the text is {len(ids)} tokens long, more than the model's context "
                f"of {limit} tokens; shorten the prompt or the context prefixes"
            )
        positions.append(last)
    return [list(ids) for ids in enc["input_ids"]], positions


def encode_through_subject(lm, items: list[SubjectText]) -> tuple[list[list[int]], list[int]]:
    """:func:`encode_at_subject` with each text cut after the subject's last token: under causal
    attention nothing later reaches that token, so a forward that only reads there needs no more."""
    ids, positions = encode_at_subject(lm, items)
    return [seq[: pos + 1] for seq, pos in zip(ids, positions)], positions


def check_length(lm, ids: list[int], owner: str) -> None:
    """Refuse a token sequence longer than the model's context."""
    limit = max_positions(lm)
    if limit is not None and len(ids) > limit:
        raise InvalidRequestError(
            f"{owner}: the prompt with its target is {len(ids)} tokens long, more than the "
            f"model's context of {limit} tokens"
        )


def pad_token_id(tokenizer) -> int:
    """The id written into padded slots (never attended to, so any valid id works): the
    tokenizer's pad token, else its end-of-sequence token, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def pad_id(lm) -> int:
    """:func:`pad_token_id` of the model's tokenizer."""
    return pad_token_id(lm.tokenizer)


def pad_right(seqs: Sequence[Sequence[int]], pad: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids (B, L)`` and ``attention_mask (B, L)`` (1 = real token)."""
    return _pad(seqs, pad, device, left=False)


def pad_left(seqs: Sequence[Sequence[int]], pad: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists (every row's last token in the last column) into ``input_ids
    (B, L)`` and ``attention_mask (B, L)`` (1 = real token)."""
    return _pad(seqs, pad, device, left=True)


def _pad(seqs: Sequence[Sequence[int]], pad: int, device, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if not len(seq):  # an empty row stays all padding
            continue
        cols = slice(length - len(seq), length) if left else slice(0, len(seq))
        input_ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids.to(device), attention_mask.to(device)


def length_sorted_chunks(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into chunks of at most ``batch_size``, similar lengths together
    (less padding per forward pass)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def check_layer(lm, layer: int) -> int:
    """``layer`` as an int in ``0..n_layers-1``, else :class:`InvalidRequestError`."""
    n = lm.n_layers
    try:
        index = operator.index(layer)
    except TypeError:
        index = None
    if isinstance(layer, bool) or index is None or not 0 <= index < n:
        raise InvalidRequestError(f"layer {layer!r} is out of range: the model has {n} blocks (0..{n - 1})")
    return index
