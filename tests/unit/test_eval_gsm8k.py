"""GSM8K answer extraction and scoring, fed with known answers (no model), plus one tiny-model run."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from eval_tiny_lm import make_lm
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.gsm8k import (
    build_prompt,
    evaluate_gsm8k,
    extract_answer,
    normalize_number,
    reference_answer,
    score_answer,
    shot_indices,
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "general" / "gsm8k" / "test.jsonl"
SOLUTION = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"


@pytest.mark.parametrize("text,expected", [
    ("#### 18", "18"),
    ("####18", "18"),
    ("so she makes 9 * 2 = 18 dollars.\n#### 18\n\nQuestion: next", "18"),
    ("The answer is 1,000.", "1000"),
    ("#### $1,234.50", "1234.50"),
    ("It costs $5. Then 7 more, total 12.", "12"),
    ("The change is -3 degrees", "-3"),
    ("#### 18.0", "18.0"),
    ("#### (no number here) but earlier 7 and later 9", "9"),
    ("no digits at all", None),
    ("", None),
])
def test_extract_answer_edge_cases(text, expected):
    got = extract_answer(text)
    assert got == (None if expected is None else Decimal(expected))


def test_numbers_compare_as_decimals():
    assert normalize_number("1,000") == normalize_number("1000.0") == Decimal(1000)
    assert normalize_number("$ 18.") == Decimal(18)
    assert normalize_number("eighteen") is None
    assert score_answer("#### 18.00", SOLUTION) == 1


def test_scorer_gives_one_for_right_and_zero_for_wrong_answers():
    assert score_answer(SOLUTION, SOLUTION) == 1
    assert score_answer("so the total is 18", SOLUTION) == 1
    assert score_answer("#### 19", SOLUTION) == 0
    assert score_answer("#### 18 ... no wait 19", SOLUTION) == 1  # the number right after #### counts
    assert score_answer("I do not know", SOLUTION) == 0
    with pytest.raises(EvalDataError, match="####"):
        reference_answer("no final line")


@pytest.mark.skipif(not DATA.is_file(), reason=f"GSM8K data not found at {DATA}")
def test_every_reference_solution_scores_one_and_a_shifted_answer_zero():
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(records) == 1319
    for rec in records:
        assert score_answer(rec["answer"], rec["answer"]) == 1
        wrong = f"#### {reference_answer(rec['answer']) + 1}"
        assert score_answer(wrong, rec["answer"]) == 0


def test_shots_exclude_the_question_and_are_deterministic():
    for q in range(10):
        shots = shot_indices(10, q, 8, seed=0)
        assert len(shots) == 8 and q not in shots and len(set(shots)) == 8
    assert shot_indices(10, 3, 8, seed=0) == shot_indices(10, 3, 8, seed=0)
    assert shot_indices(50, 3, 8, seed=0) != shot_indices(50, 3, 8, seed=1)
    with pytest.raises(EvalDataError, match="shots"):
        shot_indices(5, 0, 5, seed=0)


def test_prompt_layout():
    prompt = build_prompt("Q2?", [("Q1?", "A1\n#### 1\n")])
    assert prompt == "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer:"


def test_evaluate_on_tiny_model(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    lm = make_lm()
    out = evaluate_gsm8k(lm, path, k=2, limit=3, max_new_tokens=6)
    assert out["n"] == 3 and out["k"] == 2 and 0.0 <= out["acc"] <= 1.0
    assert out["acc"] == sum(it["correct"] for it in out["items"]) / 3
    assert [it["reference"] for it in out["items"]] == ["1", "2", "3"]
    with pytest.raises(EvalDataError, match="limit"):
        evaluate_gsm8k(lm, path, limit=0)
