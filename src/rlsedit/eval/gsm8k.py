"""GSM8K: k-shot greedy chain-of-thought, exact match of the final number.

Prompt (k worked examples, then the question)::

    Question: <shot question>
    Answer: <shot solution, ending "#### <number>">

    ...
    Question: <question>
    Answer:

Shots come from the same file, never the question itself: the file's indices are shuffled
once with ``random.Random(seed)`` and each question takes the first ``k`` of that order
that are not itself, so every question sees the same shots except where it is one of them.

Scoring: the reference is the number after ``####`` in the file's answer; the prediction is
the number right after the first ``####`` in the generation, else the last number in it.
Numbers are compared as exact decimals after removing thousands separators, a currency
sign and a trailing period (``"1,000.00"`` = ``"1000"``). No number = wrong.
"""

from __future__ import annotations

import random
import re
import statistics
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Sequence

from .datafiles import EvalDataError, check_count, field, read_jsonl
from .decoding import greedy_generate

STOP = ("\n\nQuestion:", "Question:", "\n\n\n")
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def normalize_number(text: str) -> Decimal | None:
    """``"$1,000.50"`` → ``Decimal("1000.50")``; ``None`` if ``text`` is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not cleaned or not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", cleaned):
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_answer(text: str) -> Decimal | None:
    """The number right after the first ``####`` (whitespace and ``$`` allowed), else the last
    number in ``text``, else ``None``."""
    marker = text.find("####")
    if marker >= 0:
        after = _NUMBER.match(text[marker + 4:].lstrip())  # the number must follow "####" directly
        if after is not None:
            return normalize_number(after.group(0))
    numbers = _NUMBER.findall(text)
    for candidate in reversed(numbers):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def reference_answer(solution: str, where: str = "gsm8k record") -> Decimal:
    """The gold number of a GSM8K solution (after ``####``)."""
    marker = solution.rfind("####")
    value = normalize_number(solution[marker + 4:]) if marker >= 0 else None
    if value is None:
        raise EvalDataError(f"{where}: the answer has no '#### <number>' line")
    return value


def score_answer(generation: str, solution: str) -> int:
    """1 when the number extracted from ``generation`` equals the reference of ``solution``."""
    predicted = extract_answer(generation)
    return int(predicted is not None and predicted == reference_answer(solution))


def build_prompt(question: str, shots: Sequence[tuple[str, str]]) -> str:
    """k worked examples followed by the question (see the module docstring)."""
    parts = [f"Question: {q}\nAnswer: {a.strip()}\n\n" for q, a in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def shot_indices(total: int, question: int, k: int, seed: int) -> list[int]:
    """The ``k`` shot indices for question ``question`` (a fixed seeded order minus itself)."""
    if k > total - 1:
        raise EvalDataError(f"k={k} shots need at least {k + 1} problems in the file, it has {total}")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return [i for i in order if i != question][:k]


def evaluate_gsm8k(
    lm,
    path: str | Path,
    *,
    k: int = 8,
    limit: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy k-shot answers on the first ``limit`` problems."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise EvalDataError(f"k must be a non-negative integer, got {k!r}")
    check_count(limit, "limit")
    records = read_jsonl(path, "gsm8k")
    problems = [
        (field(r, "question", str, f"gsm8k record {i}"), field(r, "answer", str, f"gsm8k record {i}"))
        for i, r in enumerate(records)
    ]
    if not problems:
        raise EvalDataError(f"gsm8k file {str(path)!r} has no problems")
    count = len(problems) if limit is None else min(limit, len(problems))
    prompts = [build_prompt(problems[q][0], [problems[s] for s in shot_indices(len(problems), q, k, seed)])
               for q in range(count)]
    generations = greedy_generate(lm, prompts, max_new_tokens, stop=STOP, batch_size=batch_size)
    items = []
    for q, text in enumerate(generations):
        predicted = extract_answer(text)
        items.append({
            "index": q,
            "correct": score_answer(text, problems[q][1]),
            "predicted": None if predicted is None else str(predicted),
            "reference": str(reference_answer(problems[q][1], f"gsm8k record {q}")),
            "generation": text,
        })
    return {
        "acc": statistics.fmean(it["correct"] for it in items),
        "n": len(items),
        "k": k,
        "chance": 0.0,
        "chance_note": "open-ended numeric answer: no guessing baseline",
        "items": items,
    }
