"""run_eval: every suite on a tiny model against a miniature data directory."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from eval_tiny_lm import make_lm
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.runner import DATA_FILES, GENERAL_SUITES, _finite_json, run_eval
from rlsedit.eval.sandbox import SandboxLimits
from rlsedit.requests import parse_request

CF = {"case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
      "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
      "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"}
ZSRE = {"subject": "UniFirst", "src": "What does UniFirst make?", "rephrase": "UniFirst makes what?",
        "alt": "aircraft", "answers": ["uniforms"], "loc": "nq question: capital of France", "loc_ans": "Paris"}


def make_data_dir(root):
    def jsonl(rel, rows):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    (root / "corpus").mkdir(parents=True)
    (root / DATA_FILES["wikitext"]).write_text(" = Title = \n The piano is a keyboard instrument . " * 20)
    jsonl(DATA_FILES["corpus"], [{"text": "The piano is a keyboard instrument with hammers striking strings inside a large wooden case."}])
    (root / "knowns").mkdir()
    (root / DATA_FILES["knowns"]).write_text(json.dumps(
        [{"known_id": i, "prompt": f"Fact {i} is in", "attribute": "Paris", "subject": "x"} for i in range(3)]))
    jsonl(DATA_FILES["sst2"], [{"sentence": f"s{i}", "label": i % 2} for i in range(3)])
    jsonl(DATA_FILES["sentiment_analysis"], [{"sentence": f"s{i}", "label": str(i % 2)} for i in range(3)])
    jsonl(DATA_FILES["mrpc"], [{"sentence1": "a", "sentence2": "b", "label": i % 2} for i in range(3)])
    jsonl(DATA_FILES["cola"], [{"sentence": "a b", "label": i % 2} for i in range(3)])
    jsonl(DATA_FILES["rte"], [{"sentence1": "a", "sentence2": "b", "label": i % 2} for i in range(3)])
    jsonl(DATA_FILES["nli"], [{"sentence1": "a", "sentence2": "b", "label": "entailment"} for _ in range(3)])
    jsonl(DATA_FILES["dialogue"], [{"answers": "A", "options": ["w", "x", "y", "z"], "article": "m : hi"}] * 3)
    jsonl(DATA_FILES["glue_mmlu"], [{"question": "q", "choices": ["1", "2", "3", "4"], "answer": 2}] * 3)
    jsonl(DATA_FILES["mmlu"], [{"subject": "s", "input": "q\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", "output": "D"}] * 3)
    jsonl(DATA_FILES["gsm8k"], [{"question": f"{i} + 1?", "answer": f"#### {i + 1}"} for i in range(3)])
    he = root / DATA_FILES["humaneval"]
    he.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(he, "wt") as handle:
        handle.write(json.dumps({"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                                 "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}) + "\n")
    return root


def test_all_suites_json_with_chance(tmp_path):
    lm = make_lm(dtype=torch.float32)
    data = make_data_dir(tmp_path / "data")
    out = run_eval(
        lm, counterfact=[parse_request(CF)], zsre=[parse_request(ZSRE)], general=GENERAL_SUITES,
        data_dir=data, n=2, limit=1, ppl_tokens=40, gsm8k_shots=1, fluency=True, consistency=True,
        sandbox_limits=SandboxLimits(timeout_s=5.0), batch_size=4,
    )
    text = json.dumps(out, allow_nan=False)  # strict JSON
    assert json.loads(text) == out
    assert set(out["general"]) == set(GENERAL_SUITES)
    for name, result in out["general"].items():
        assert "chance" in result, name
        assert "items" not in result and "records" not in result  # details off
    for name in ("knowns", "mmlu", "sst2"):
        assert out["general"][name]["n"] == 2
    assert out["general"]["gsm8k"]["n"] == 1 and out["general"]["humaneval"]["n"] == 1
    assert 0.0 <= out["counterfact"]["summary"]["efficacy"] <= 1.0
    assert out["counterfact"]["summary"]["consistency_n"] == 1
    assert "locality_answer_acc" in out["zsre"]["summary"]
    assert set(out["meta"]["seconds"]) >= {"counterfact", "zsre", "wikitext", "humaneval"}
    assert out["nonfinite"] == []


def test_details_keep_records(tmp_path):
    lm = make_lm()
    out = run_eval(lm, counterfact=[parse_request(CF)], details=True)
    assert len(out["counterfact"]["records"]) == 1
    assert "general" not in out


def test_nonfinite_values_become_null_and_are_listed():
    nonfinite: list[str] = []
    clean = _finite_json({"a": {"ppl": float("inf")}, "b": [1.0, float("nan")]}, "$", nonfinite)
    assert clean == {"a": {"ppl": None}, "b": [1.0, None]}
    assert nonfinite == ["$.a.ppl", "$.b[1]"]


def test_bad_arguments(tmp_path):
    lm = make_lm()
    with pytest.raises(EvalDataError, match="unknown general suite"):
        run_eval(lm, general=["squad"], data_dir=tmp_path)
    with pytest.raises(EvalDataError, match="no evaluation data folder; pass --data-dir DIR .or set RLSEDIT_DATA_DIR"):
        run_eval(lm, general=["mmlu"])
    # a folder without the file: the message names the file expected and the public copy
    with pytest.raises(EvalDataError, match=r"expected the file .*mmlu_val.jsonl.*artidoro/qlora"):
        run_eval(lm, general=["mmlu"], data_dir=tmp_path)
    with pytest.raises(EvalDataError, match="counterfact"):
        run_eval(lm, consistency=True, data_dir=tmp_path)
    with pytest.raises(EvalDataError, match="n must"):
        run_eval(lm, general=["mmlu"], data_dir=tmp_path, n=0)
