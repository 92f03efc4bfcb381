"""MQuAKE-layout multi-hop files: read as edit requests (one per rewrite) and as cases, and scored
on a scripted model (raw and chat answers, aliases, the case-level count, sample rows)."""

from __future__ import annotations

import copy
import json

import pytest

from rlsedit.errors import InvalidRequestError
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.generation import GenerationConfig
from rlsedit.eval.multihop import RAW_QUESTION, evaluate_multihop, format_multihop, read_multihop
from rlsedit.requests import parse_records, parse_request, read_requests, read_requests_skipping_bad
from scripted_lm import scripted_lm
from test_eval_cli import setup  # noqa: F401  (the tiny model and corpus, as a fixture)

# hand-written in MQuAKE's layout (no MQuAKE data is downloaded)
CASES = [
    {"case_id": 1,
     "requested_rewrite": [
         {"prompt": "{} is a citizen of", "subject": "Ellie Kemper", "target_new": {"str": "Croatia", "id": "Q224"},
          "target_true": {"str": "United States", "id": "Q30"}, "question": "Where is Ellie Kemper a citizen?"}],
     "questions": ["Who leads the country of Ellie Kemper ?", "Who is head of Ellie Kemper 's country ?",
                   "Name the leader of the land of Ellie Kemper ."],
     "answer": "Joe Biden", "answer_alias": ["Biden"],
     "new_answer": "Zoran Milanovic", "new_answer_alias": ["Milanovic"]},
    {"case_id": 2,
     "requested_rewrite": [
         {"prompt": "{} was created by", "subject": "Tim Tom", "target_new": {"str": "Pixar"},
          "target_true": {"str": "BBC"}},
         {"prompt": "{} is a citizen of", "subject": "Ellie Kemper", "target_new": {"str": "Croatia"},
          "target_true": {"str": "United States"}}],  # the same rewrite as case 1: applied once
     "questions": ["Where is the maker of Tim Tom based ?", "In which city is the creator of Tim Tom ?",
                   "Tim Tom 's creator sits where ?"],
     "answer": "London", "answer_alias": [], "new_answer": "Emeryville", "new_answer_alias": []},
]
RAW = {
    RAW_QUESTION.format(CASES[0]["questions"][0]): "Milanovic",  # an alias, first: begins
    RAW_QUESTION.format(CASES[0]["questions"][1]): "It is Joe Biden",  # still the old answer
    RAW_QUESTION.format(CASES[0]["questions"][2]): "the president Zoran Milanovic",  # mentions
    RAW_QUESTION.format(CASES[1]["questions"][0]): "London",
    RAW_QUESTION.format(CASES[1]["questions"][1]): "London",
    RAW_QUESTION.format(CASES[1]["questions"][2]): "nobody",
}
CHAT = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}<assistant>"


def _file(tmp_path, cases, name="mquake.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cases))
    return path


def test_edit_requests_one_per_rewrite_and_a_repeated_rewrite_once(tmp_path):
    path = _file(tmp_path, CASES)
    requests = read_requests(path)
    assert [r.id for r in requests] == ["1.0", "2.0"]  # case 2's Ellie Kemper rewrite is case 1's
    assert requests[0].text == "Ellie Kemper is a citizen of" and requests[0].target_new == "Croatia"
    assert requests[0].target_true == "United States" and requests[1].target_new == "Pixar"
    assert [r.id for r in parse_records(CASES[1], 1)] == ["2.0", "2.1"]
    assert [r.id for r in read_requests(path, limit=1)] == ["1.0"]  # limit counts cases
    with pytest.raises(InvalidRequestError, match="MQuAKE case: read it with parse_records"):
        parse_request(CASES[1], 1)


def test_conflicting_and_malformed_cases_are_refused(tmp_path):
    conflict = copy.deepcopy(CASES)
    conflict[1]["requested_rewrite"][1]["target_new"] = {"str": "Serbia"}
    with pytest.raises(InvalidRequestError, match=r"rewrite '2\.1' sets .*'Serbia'.*'1\.0' sets it to 'Croatia'"):
        read_requests(_file(tmp_path, conflict))
    # --skip-bad: the conflicting case is skipped whole, the first stays
    kept, skipped = read_requests_skipping_bad(_file(tmp_path, conflict))
    assert [r.id for r in kept] == ["1.0"] and [s["id"] for s in skipped] == ["2"]
    bad = copy.deepcopy(CASES)
    del bad[1]["requested_rewrite"][0]["subject"]
    with pytest.raises(InvalidRequestError, match=r"case_id 2\), requested_rewrite\[0\]: missing field 'subject'"):
        read_requests(_file(tmp_path, bad))
    empty = copy.deepcopy(CASES[:1])
    empty[0]["requested_rewrite"] = []
    with pytest.raises(InvalidRequestError, match="'requested_rewrite' is an empty list"):
        read_requests(_file(tmp_path, empty))


def test_read_multihop_checks_every_field_and_names_the_file(tmp_path):
    cases = read_multihop(_file(tmp_path, CASES))
    assert [c.id for c in cases] == ["1", "2"]
    assert cases[0].new_answers == ("Zoran Milanovic", "Milanovic") and cases[0].old_answers == ("Joe Biden", "Biden")
    assert [r.id for r in cases[1].requests] == ["2.0", "2.1"] and len(cases[1].questions) == 3
    for field, value, message in (("questions", "Who?", "field 'questions' must be a list"),
                                  ("questions", [], "field 'questions' is an empty list"),
                                  ("new_answer", "", "field 'new_answer' must be a non-empty string"),
                                  ("answer_alias", "Biden", "field 'answer_alias' must be a list")):
        bad = copy.deepcopy(CASES)
        bad[1][field] = value
        path = _file(tmp_path, bad, "bad.json")
        with pytest.raises(EvalDataError, match=message) as err:
            read_multihop(path)
        assert str(path) in str(err.value) and "case #1 (case_id 2)" in str(err.value)
    missing = copy.deepcopy(CASES)
    del missing[0]["answer"]
    with pytest.raises(EvalDataError, match="field 'answer' must be"):
        read_multihop(_file(tmp_path, missing, "bad.json"))
    not_mquake = [{"prompt": "{} is", "subject": "X", "target_new": "y"}]
    with pytest.raises(EvalDataError, match="not an MQuAKE case"):
        read_multihop(_file(tmp_path, not_mquake, "bad.json"))
    with pytest.raises(EvalDataError, match="multi-hop file .*does not exist"):
        read_multihop(tmp_path / "nothing.json")


def test_raw_answers_are_scored_with_aliases_and_per_case(tmp_path):
    cases = read_multihop(_file(tmp_path, CASES))
    out = evaluate_multihop(scripted_lm(RAW), cases, GenerationConfig(chat=False))
    first = out["records"][0]["questions"]
    assert [q["raw"]["new_begins"] for q in first] == [True, False, False]
    assert [q["raw"]["new_mentions"] for q in first] == [True, False, True]
    assert [q["raw"]["old_mentions"] for q in first] == [False, True, False]
    s = out["summary"]
    assert s["raw_begins"] == 1 / 6 and s["raw_mentions"] == 2 / 6 and s["raw_old_mentions"] == 3 / 6
    assert s["raw_case_mentions"] == 0.5  # case 1 answered by some question, case 2 by none
    assert s["chat_mentions"] is None and s["chat_case_mentions"] is None
    assert out["counts"] == {"cases": 2, "cases_total": 2, "questions": 6, "rewrites": 3}
    assert any("applies none of the file's rewrites" in note for note in out["notes"])
    sample = {r["prompt"]: r for r in out["samples"]}
    assert sample[CASES[0]["questions"][1]]["verdict"] == "misses (old: mentions)"
    assert sample[CASES[0]["questions"][0]]["verdict"] == "begins (old: misses)"
    assert {r["kind"] for r in out["samples"]} == {"multihop"}
    assert json.loads(json.dumps(out))["summary"] == s


def test_chat_answers_and_the_seeded_case_sample(tmp_path):
    cases = read_multihop(_file(tmp_path, CASES))
    chat = {f"<user> {q} <assistant>": a for q, a in (
        (CASES[0]["questions"][0], "The leader is Zoran Milanovic"), (CASES[1]["questions"][2], "It is Emeryville"))}
    lm = scripted_lm({**RAW, **chat}, chat_template=CHAT)
    out = evaluate_multihop(lm, cases, GenerationConfig())
    s = out["summary"]
    assert s["chat_begins"] == 0.0 and s["chat_mentions"] == 2 / 6 and s["chat_case_mentions"] == 1.0
    assert {r["kind"] for r in out["samples"]} == {"multihop", "multihop chat"}
    lines = format_multihop(out)
    assert any(line.startswith("  multi-hop cases answered (chat): 1.0000") for line in lines)
    assert any(line.startswith("| multihop chat |") for line in lines)
    one = evaluate_multihop(lm, cases, GenerationConfig(n=1, seed=0))
    assert one["counts"]["cases"] == 1 and one["counts"]["cases_total"] == 2
    with pytest.raises(EvalDataError, match="no chat template"):
        evaluate_multihop(scripted_lm(RAW), cases, GenerationConfig(chat=True))


def test_edit_applies_a_multihop_file_and_eval_asks_its_questions(tmp_path, setup, capsys):
    from rlsedit import cli
    from test_bench_methods import FAST

    path = _file(tmp_path, CASES)
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({"mom2_n_samples": 200, **FAST}))
    cache = ["--cache-dir", str(setup["root"] / "cache")]
    state = tmp_path / "state"
    assert cli.main(["edit", "--state", str(state), "--edits", str(path), "--model", str(setup["model"]),
                     "--hparams", str(hparams), "--corpus", str(setup["corpus"]), "--batch-size", "2", "--json",
                     *cache]) == 0
    edited = json.loads(capsys.readouterr().out)
    assert edited["applied"] == 2 and edited["edits_total"] == 2  # 3 rewrites, one repeated
    assert cli.main(["eval", "--state", str(state), "--multihop", str(path), "--json", *cache]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "counterfact" not in out and "generation" not in out  # no --data: only the questions
    res = out["multihop"]
    assert res["counts"] == {"cases": 2, "cases_total": 2, "questions": 6, "rewrites": 3}
    assert "records" not in res and len(res["samples"]) == 6 and res["settings"]["chat"] is False
    assert all(0.0 <= res["summary"][k] <= 1.0 for k in ("raw_begins", "raw_mentions", "raw_case_mentions"))
    assert cli.main(["eval", "--model", str(setup["model"]), "--multihop", str(path), "--n", "1", *cache]) == 0
    text = capsys.readouterr().out
    assert "multihop (1 of 1 cases, 3 questions):" in text and "| multihop |" in text
    # a bad file fails before any model loads, naming the file and the field
    bad = copy.deepcopy(CASES)
    bad[0]["new_answer"] = 3
    bad_path = _file(tmp_path, bad, "bad.json")
    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--multihop", str(bad_path)]) == 3
    err = capsys.readouterr().err
    assert str(bad_path) in err and "'new_answer'" in err
