"""Text corpora for the key second moments: reading them, hashing them, the bundled default.

A corpus is a ``.jsonl`` file (one JSON object a line with a string ``"text"`` field), any
other UTF-8 text file (documents separated by blank lines), or a sequence of strings.

The default corpus ships inside the package (``rlsedit/data/enwiki_pages_2MB.jsonl``, CC BY-SA
3.0, see ``rlsedit/data/README.md``) and is found through :mod:`importlib.resources`, so an
installed wheel needs no data folder beside it. A state directory records it by the name
:data:`BUNDLED_CORPUS` rather than by a path, since the path changes with every install.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import InvalidRequestError
from ..files import file_sha256

BUNDLED_CORPUS = "bundled:enwiki_pages_2MB.jsonl"
_BUNDLED_FILE = "enwiki_pages_2MB.jsonl"


def bundled_corpus() -> Path:
    """Path of the corpus that ships with the package."""
    path = resources.files("rlsedit") / "data" / _BUNDLED_FILE
    # a wheel or a source install unpacks package data to real files; a zipped install would not
    if not isinstance(path, Path) or not path.is_file():
        raise InvalidRequestError(
            f"the bundled corpus {_BUNDLED_FILE} is missing from this rlsedit install ({path}); "
            "reinstall the package or pass --corpus FILE")
    return path


def resolve_corpus(corpus: str | Path | None) -> Path:
    """The file of a corpus given by path, by the name :data:`BUNDLED_CORPUS`, or ``None``
    (the bundled default). A missing file raises :class:`InvalidRequestError` naming it."""
    if corpus is None or str(corpus) == BUNDLED_CORPUS:
        return bundled_corpus()
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise InvalidRequestError(
            f"corpus {str(path)!r} for the key second moments does not exist; pass --corpus FILE "
            "(a .jsonl file with a \"text\" field per line, or plain text), or omit it for the bundled corpus")
    return path


def corpus_label(corpus: str | Path | None) -> str:
    """How a state records its corpus: :data:`BUNDLED_CORPUS` for the default, else the path."""
    if corpus is None or str(corpus) == BUNDLED_CORPUS:
        return BUNDLED_CORPUS
    return str(Path(corpus).expanduser().resolve())


def corpus_digest(corpus: str | Path | Sequence[str]) -> tuple[str, str]:
    """``(sha256, label)`` of a corpus file (its bytes) or a list of texts (their JSON)."""
    if isinstance(corpus, (str, Path)):
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise InvalidRequestError(f"corpus file {str(path)!r} does not exist")
        return file_sha256(path)[0], str(path.resolve())
    digest = hashlib.sha256()
    texts = list(corpus)
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequestError("a corpus given as a sequence must hold strings only")
    digest.update(json.dumps(texts, ensure_ascii=False).encode())
    return digest.hexdigest(), f"<{len(texts)} texts>"


def iter_corpus_texts(corpus: str | Path | Sequence[str]) -> Iterator[str]:
    """The documents of a corpus, in order.

    A ``.jsonl`` file holds one JSON object per line with a string ``"text"`` field (blank
    lines are skipped); any other file is plain UTF-8 text, split into documents at blank
    lines; a sequence of strings is used as is.
    """
    if not isinstance(corpus, (str, Path)):
        yield from (t for t in corpus if t.strip())
        return
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"corpus file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise InvalidRequestError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise InvalidRequestError(
                        f"{path}:{lineno}: expected a JSON object with a string \"text\" field"
                    )
                if text.strip():
                    yield text
        return
    with path.open(encoding="utf-8") as fh:
        paragraph: list[str] = []
        for line in fh:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph)
                paragraph = []
        if paragraph:
            yield "".join(paragraph)
