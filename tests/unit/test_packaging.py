"""What the installed package may rely on: its own files only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlsedit.errors import InvalidRequestError
from rlsedit.locate.corpus import BUNDLED_CORPUS, bundled_corpus, corpus_label, resolve_corpus

SRC = Path(__file__).resolve().parents[2] / "src" / "rlsedit"


def test_no_source_file_reaches_above_the_package():
    # Path(__file__).parents[N] with N >= 2 leaves rlsedit/<subpackage>/ and lands in the
    # checkout (or in site-packages), where the project's data folder does not exist for users
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"parents\[(\d+)\]", text):
            if int(match.group(1)) >= 2:
                offenders.append(f"{path.relative_to(SRC)}: {match.group(0)}")
        if re.search(r"""["']shared["']""", text):
            offenders.append(f"{path.relative_to(SRC)}: names a 'shared' folder")
    assert offenders == []


def test_bundled_corpus_is_package_data_and_is_the_default():
    path = bundled_corpus()
    assert path.is_relative_to(SRC.resolve()) or "site-packages" in str(path)
    assert path.name == "enwiki_pages_2MB.jsonl" and path.stat().st_size > 1_000_000
    assert (path.parent / "README.md").read_text().count("CC BY-SA 3.0") >= 1  # license travels with it
    assert resolve_corpus(None) == path and resolve_corpus(BUNDLED_CORPUS) == path
    assert corpus_label(None) == BUNDLED_CORPUS


def test_a_missing_corpus_names_the_file(tmp_path):
    with pytest.raises(InvalidRequestError, match=r"corpus '.*nothing\.jsonl' for the key second moments does not exist"):
        resolve_corpus(tmp_path / "nothing.jsonl")
