"""Context prefixes: short model-written texts put in front of a prompt (MEMIT's "context
templates"), so keys and targets are averaged over contexts instead of fitted to one.

MEMIT (Meng et al., 2023, ``memit_main.get_context_templates``) samples continuations of the
starts "The", "Therefore", "Because", "I", "You" with top-5 sampling, 10 tokens each
(counting the start), replaces braces by spaces, and appends ``". {}"``; the bare ``"{}"``
comes first. We do the same with a local, seeded :class:`torch.Generator` (never the
global RNG), so the prefixes are a function of (model, count, length, seed).

ROME (Meng et al., 2022, ``rome_main.get_context_templates``) samples its prefixes from the
end-of-text token alone, ``n`` texts of ``length`` tokens (counting that token) for each
``[length, n]`` of ``context_template_length_params`` — ``[[5, 10], [10, 10]]``: 10 of 5 and
10 of 10 — and appends ``". {}"``, after the bare ``"{}"``: 21 in all
(:func:`rome_context_prefixes`).

For instruct models, an editor may add one more prefix (``chat_prefix`` in the editor config,
:func:`chat_context_prefix`): the prompt as the user turn of the tokenizer's chat template,
followed by the assistant's turn, so the value target is also fitted where a chat answer
starts and the fact transfers to chat use. The text after its slot is kept: the target
follows the whole filled prefix.
"""

from __future__ import annotations

import logging
import re
import unicodedata

import torch

from ..errors import InvalidRequestError
from ..requests import SUBJECT_SLOT

log = logging.getLogger(__name__)

STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
"""The words MEMIT starts its context continuations with (cycled when ``count > 5``)."""

TOP_K = 5
"""Top-k sampling width, as MEMIT's ``generate_fast``."""


def clean_sampled_text(text: str, *, blank: str = "") -> str:
    """Sampled text on one line: NFKC-folded, control characters and the characters of ``blank``
    turned into spaces, runs of spaces collapsed.

    Control characters, newlines and runs of spaces would make the text look like a separate
    document; U+FFFD marks a multi-byte character cut by the token limit (dropped).
    """
    text = unicodedata.normalize("NFKC", text).replace("\ufffd", "")
    text = "".join(" " if ch in blank or unicodedata.category(ch).startswith("C") else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def _clean(text: str) -> str:
    # braces would clash with the "{}" slot of a prefix template
    return clean_sampled_text(text, blank="{}")


def _sample_continuation(lm, start: str, new_tokens: int, generator: torch.Generator) -> str:
    """``start`` continued by up to ``new_tokens`` top-k-sampled tokens (stops at a special token)."""
    ids = lm.tokenizer(start, add_special_tokens=True, return_tensors="pt")["input_ids"].to(lm.device)
    return _sample_ids(lm, ids, new_tokens, generator)


def _sample_ids(lm, ids: torch.Tensor, new_tokens: int, generator: torch.Generator) -> str:
    """The text of token ids ``(1, n)`` continued by up to ``new_tokens`` top-k-sampled tokens
    (stops at a special token), special tokens dropped."""
    tokenizer = lm.tokenizer
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            # logits_to_keep=1: only the last position goes through the LM head
            logits = lm.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]  # (vocab,)
            top = torch.topk(logits.float(), TOP_K)
            probs = torch.softmax(top.values, dim=-1)
            pick = top.indices[torch.multinomial(probs, 1, generator=generator)]
            if int(pick) in special:
                break
            ids = torch.cat([ids, pick.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)


def context_prefixes(lm, *, count: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """``["{}"]`` followed by ``count`` prefixes ``"<generated text>. {}"``.

    Args:
        lm: the loaded model (it writes the texts; the result is memoised in ``lm.cache``
            under these arguments, so later calls — also after edits change the weights —
            return the same prefixes).
        count: number of generated prefixes (0 gives just ``["{}"]``).
        length: tokens per generated text, counting its start word (MEMIT: 10).
        seed: seed of the local sampling generator.

    Each generated text keeps no braces, so every prefix holds exactly one ``{}``.
    """
    for name, value, low in (("count", count, 0), ("length", length, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    key = ("context_prefixes", count, length, seed)
    if key not in lm.cache:
        generator = torch.Generator(device=lm.device)
        generator.manual_seed(seed)
        prefixes = [SUBJECT_SLOT]
        for j in range(count):
            start = STARTS[j % len(STARTS)]
            start_tokens = len(lm.tokenizer(start, add_special_tokens=False)["input_ids"])
            text = _clean(_sample_continuation(lm, start, max(0, length - start_tokens), generator))
            prefixes.append(f"{text}. {SUBJECT_SLOT}")
        log.info("context prefixes for %s: %s", lm.name, prefixes)
        lm.cache[key] = tuple(prefixes)
    return list(lm.cache[key])


ROME_LENGTH_PARAMS: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
"""ROME's ``context_template_length_params``: ``(length, count)`` pairs."""


def _document_start_id(tokenizer) -> int | None:
    """The token a document starts from: GPT-2's ``<|endoftext|>`` where the vocabulary has it
    (ROME's start; SmolLM2's document separator, whose BOS/EOS are chat tokens), else the BOS the
    tokenizer itself puts first (``<bos>``, ``<|begin_of_text|>``), else BOS, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    first = tokenizer("a", add_special_tokens=True)["input_ids"][:1]
    if first and first[0] == tokenizer.bos_token_id:
        return int(first[0])
    for value in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return None


def rome_context_prefixes(lm, length_params=ROME_LENGTH_PARAMS, *, seed: int = 0) -> list[str]:
    """ROME's context prefixes: ``["{}"]`` then, for each ``(length, count)``, ``count`` texts
    ``"<generated>. {}"`` sampled from a document-start token alone (:func:`_document_start_id`),
    ``length`` tokens counting it.

    Memoised in ``lm.cache`` like :func:`context_prefixes`.
    """
    try:
        pairs = tuple((int(length), int(count)) for length, count in length_params)
    except (TypeError, ValueError):
        raise ValueError(f"length_params must be (length, count) pairs, got {length_params!r}") from None
    if not pairs or any(length < 2 or count < 1 for length, count in pairs):
        raise ValueError(f"length_params needs lengths >= 2 and counts >= 1, got {length_params!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    key = ("rome_context_prefixes", pairs, seed)
    if key not in lm.cache:
        start = _document_start_id(lm.tokenizer)
        if start is None:
            raise ValueError(f"{lm.name}: the tokenizer has neither a beginning- nor an end-of-text token")
        generator = torch.Generator(device=lm.device)
        generator.manual_seed(seed)
        ids = torch.tensor([[start]], device=lm.device)
        prefixes = [SUBJECT_SLOT]
        for length, count in pairs:
            for _ in range(count):
                text = _clean(_sample_ids(lm, ids, length - 1, generator))
                prefixes.append(f"{text}. {SUBJECT_SLOT}")
        log.info("ROME context prefixes for %s: %s", lm.name, prefixes)
        lm.cache[key] = tuple(prefixes)
    return list(lm.cache[key])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, content: str) -> str:
    """``content`` as the user turn of the tokenizer's chat template, ready for the assistant's
    answer: the text that is then encoded *with* the tokenizer's special tokens.

    A template that writes its own BOS text would give two BOS tokens when the tokenizer also
    adds one, so the template's is dropped in that case. A tokenizer without a template raises
    :class:`~rlsedit.errors.InvalidRequestError`.
    """
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise InvalidRequestError(
            f"the tokenizer {name!r} has no chat template, so nothing can be put in chat form; "
            "use an instruct model with a template (SmolLM2-Instruct has one)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is not None and text.startswith(bos):
        added = tokenizer("x", add_special_tokens=True)["input_ids"]
        if added and added[0] == bos_id:
            text = text[len(bos):]
    return text


def chat_context_prefix(tokenizer) -> str:
    """The chat context prefix: ``"{}"`` templated as the user turn (:func:`chat_text`), e.g.
    ``"<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n"`` (after SmolLM2's system turn).

    Its ``{}`` takes the prompt, and the target follows the assistant's header. In the key
    average (:func:`~rlsedit.locate.keys.prefix_weights`) it is one more non-bare prefix: with
    ``"per_type"`` it shares the generated prefixes' half (the bare prompt keeps ½), with
    ``"uniform"`` it weighs ``1/P`` like every prefix; in the value target's loss it is one row
    of ``P`` like any prefix.

    Raises :class:`~rlsedit.errors.InvalidRequestError` when the tokenizer has no chat template,
    or when the templated text does not hold the slot exactly once (a template that drops,
    repeats or itself writes ``{}``).
    """
    prefix = chat_text(tokenizer, SUBJECT_SLOT)
    if prefix.count(SUBJECT_SLOT) != 1:
        raise InvalidRequestError(
            f"the chat template makes {prefix.count(SUBJECT_SLOT)} '{{}}' of the user turn '{{}}' "
            f"({prefix!r}); a chat context prefix needs exactly one")
    return prefix
