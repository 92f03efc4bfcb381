"""Consistency of generated text with the new object: TF-IDF cosine against reference text.

ROME's "reference score" (Meng et al., 2022) is

    consistency = cos( tfidf(join(generations)), tfidf(join(reference_texts(target_new))) )

with IDF statistics from Wikipedia and ``reference_texts`` = Wikipedia snippets about
subjects that share the new attribute (ROME's ``attribute_snippets.json``). Those snippets
and ROME's IDF table are not available offline, so here

* the vectorizer (scikit-learn ``TfidfVectorizer``, default settings) is fit on every
  paragraph of a local Wikipedia corpus (``corpus/enwiki_pages_20MB.jsonl``), and
* the reference texts of an object are the corpus paragraphs that mention it as a whole
  word (case-sensitive), the first ``max_paragraphs`` in file order.

Figures computed this way are labelled with :attr:`ConsistencyReference.label` —
"reference: Wikipedia corpus paragraphs, not ROME's attribute snippets" — and are not
comparable number-for-number with ROME's tables. An object the corpus never mentions has
no reference and gets ``None``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from .datafiles import EvalDataError, check_count, require_file

logger = logging.getLogger(__name__)

REFERENCE_LABEL = "reference: Wikipedia corpus paragraphs, not ROME's attribute snippets"


def corpus_paragraphs(path: str | Path, *, min_chars: int = 80) -> list[str]:
    """Paragraphs (non-empty lines of at least ``min_chars`` characters) of a JSON-lines
    corpus whose records carry a ``text`` field."""
    path = require_file(path, "corpus")
    paragraphs: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                raise EvalDataError(f"corpus file {str(path)!r} line {lineno}: expected a JSON object with 'text'") from None
            if not isinstance(text, str):
                raise EvalDataError(f"corpus file {str(path)!r} line {lineno}: 'text' must be a string")
            paragraphs.extend(p.strip() for p in text.split("\n") if len(p.strip()) >= min_chars)
    if not paragraphs:
        raise EvalDataError(f"corpus file {str(path)!r} has no paragraph of at least {min_chars} characters")
    return paragraphs


def tfidf_cosine(vectorizer: TfidfVectorizer, text_a: str, text_b: str) -> float:
    """``cos(tfidf(a), tfidf(b))``; 0 when either text has no known word."""
    enc = vectorizer.transform([text_a, text_b])
    a, b = enc[0].toarray()[0], enc[1].toarray()[0]
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


class ConsistencyReference:
    """A fitted TF-IDF vectorizer and, per object string, its reference paragraphs.

    Build it with :meth:`from_corpus`; it is an explicit object (no cache) so one fit serves
    a whole evaluation run.
    """

    label = REFERENCE_LABEL

    def __init__(self, vectorizer: TfidfVectorizer, references: dict[str, list[str]], source: str):
        self.vectorizer = vectorizer
        self.references = references
        self.source = source

    @classmethod
    def from_corpus(
        cls, path: str | Path, targets: Iterable[str], *, max_paragraphs: int = 20
    ) -> "ConsistencyReference":
        """Fit on every paragraph of the corpus; collect up to ``max_paragraphs`` paragraphs
        mentioning each target."""
        check_count(max_paragraphs, "max_paragraphs")
        paragraphs = corpus_paragraphs(path)
        vectorizer = TfidfVectorizer().fit(paragraphs)
        wanted = sorted({t.strip() for t in targets if t and t.strip()}, key=len, reverse=True)
        references: dict[str, list[str]] = {t: [] for t in wanted}
        if wanted:
            # one pass over the corpus; whole-word, case-sensitive mentions of any target
            pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(t) for t in wanted) + r")(?!\w)")
            for para in paragraphs:
                for target in set(pattern.findall(para)):
                    bucket = references[target]
                    if len(bucket) < max_paragraphs:
                        bucket.append(para)
        missing = [t for t, refs in references.items() if not refs]
        if missing:
            logger.info("%d of %d objects have no reference paragraph in %s", len(missing), len(wanted), path)
        return cls(vectorizer, references, source=str(path))

    def texts(self, target: str) -> list[str]:
        """The reference paragraphs of ``target`` (empty when it was not collected or not found)."""
        return self.references.get(target.strip(), [])

    def similarity(self, generations: Sequence[str], target: str) -> float | None:
        """ROME's consistency: TF-IDF cosine between the joined generations and the joined
        reference paragraphs of ``target``; ``None`` when ``target`` has no reference."""
        refs = self.texts(target)
        if not refs:
            return None
        return tfidf_cosine(self.vectorizer, " ".join(generations), " ".join(refs))
