"""Fluency of generated text: ROME's weighted bi-/tri-gram entropy.

ROME (Meng et al., 2022, ``experiments/py/eval_utils_counterfact.py``) scores a text by

    H(text) = mean( (2/3)·H_2, (4/3)·H_3 ),   H_n = −Σ_g f_g log₂ f_g

where ``f_g`` is the relative frequency of word n-gram ``g`` in the text, and reports the
arithmetic mean of ``H`` over the generated texts. Repetitive text (the degeneration that
editing can cause) has few distinct n-grams and a low score.

ROME tokenizes words with NLTK's ``word_tokenize`` (Treebank rules). NLTK is not a
dependency here; :func:`word_tokens` splits into runs of word characters (an apostrophe
suffix such as ``'s`` kept separate, as Treebank does) and single punctuation marks. The
two agree on ordinary prose and differ on contractions like ``can't`` and on quotes, so
our figures are close to, not identical with, ROME's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from .datafiles import EvalDataError

_TOKEN = re.compile(r"'\w+|\w+|[^\w\s]")

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


def word_tokens(text: str) -> list[str]:
    """Words, apostrophe suffixes and punctuation marks, in order."""
    return _TOKEN.findall(text)


def ngram_entropy_bits(tokens: Sequence[str], n: int) -> float:
    """``H_n = −Σ_g f_g log₂ f_g`` over the word n-grams ``g`` of ``tokens`` (0 if there are none)."""
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum((c / total) * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_ngram_entropy(text: str) -> float:
    """ROME's per-text score: ``mean_n (w_n · H_n)`` with ``n ∈ {2, 3}``, ``w = (2/3, 4/3)``."""
    tokens = word_tokens(text)
    weighted = [w * ngram_entropy_bits(tokens, n) for n, w in zip(NGRAM_ORDERS, NGRAM_WEIGHTS)]
    return sum(weighted) / len(weighted)


def ngram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of :func:`text_ngram_entropy` over ``texts`` (ROME's ``n_gram_entropy``)."""
    if not texts:
        raise EvalDataError("ngram_entropy needs at least one text")
    return sum(text_ngram_entropy(t) for t in texts) / len(texts)
