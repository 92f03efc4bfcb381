"""General-capability suites on a tiny random model, against direct computations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval_tiny_lm import make_lm
from rlsedit.eval.datafiles import EvalDataError, subsample
from rlsedit.eval.general import (
    CHOICE_TASKS,
    evaluate_choice_task,
    known_facts_recall,
    load_choice_items,
    perplexity,
    score_choices,
)
from rlsedit.eval.scoring import score_continuations

SAMPLES = {
    "sst2": {"sentence": "a gripping story ", "label": 1, "idx": 1},
    "sentiment_analysis": {"sentence": "dull and slow . ", "label": "0"},
    "mrpc": {"sentence1": "A cat sat.", "sentence2": "A cat was sitting.", "label": 1, "idx": 3},
    "cola": {"sentence": "Sam gave the ball out of the basket.", "label": 0, "idx": 128},
    "rte": {"sentence1": "P. is a Theravada monk.", "sentence2": "P. is a member of Theravada.", "label": 0, "idx": 1},
    "nli": {"index": "1", "sentence1": "Turkey stays out.", "sentence2": "U.S. bases used.", "label": "not_entailment"},
    "dialogue": {"answers": "C", "options": ["a", "b", "c", "d"], "article": "f : hi . m : hello .", "id": "dev_1"},
    "glue_mmlu": {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
    "mmlu": {"subject": "x", "input": "The following ...\n\n2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", "output": "B"},
}
GOLD_TEXT = {"sst2": " positive", "sentiment_analysis": " negative", "mrpc": " Yes", "cola": " No",
             "rte": " True", "nli": " False", "dialogue": " C", "glue_mmlu": " B", "mmlu": " B"}


@pytest.fixture(scope="module")
def lm():
    return make_lm(dtype=torch.float64, attn="sdpa")


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("task", sorted(SAMPLES))
def test_every_task_parses_with_glue_label_conventions(task, tmp_path):
    items = load_choice_items(task, write_jsonl(tmp_path / f"{task}.jsonl", [SAMPLES[task]]))
    (item,) = items
    assert item.choices[item.answer] == GOLD_TEXT[task]
    assert item.prompt and all(c.startswith(" ") for c in item.choices)


def test_choice_task_predictions_match_direct_scores(lm, tmp_path):
    rows = [{"sentence": f"review number {i} was {w}", "label": i % 2, "idx": i}
            for i, w in enumerate(["great", "awful", "fine", "bad", "superb", "poor"])]
    path = write_jsonl(tmp_path / "sst2.jsonl", rows)
    out = evaluate_choice_task(lm, "sst2", path)
    items = load_choice_items("sst2", path)
    correct = 0
    for item in items:
        s = [float(x.logprobs.mean()) for x in score_continuations(lm, [item.prompt] * 2, list(item.choices))]
        correct += int((0 if s[0] >= s[1] else 1) == item.answer)
    assert out["acc"] == pytest.approx(correct / len(items))
    assert out["n"] == 6 and out["chance"] == 0.5 and out["majority"] == 0.5
    assert {"f1_weighted", "mcc"} <= set(out)
    assert sum(out["predicted_distribution"].values()) == pytest.approx(1.0)
    assert score_choices(lm, items[:1])[0] == pytest.approx(
        [float(x.logprobs.mean()) for x in score_continuations(lm, [items[0].prompt] * 2, list(items[0].choices))])


def test_subsample_is_seeded_and_ordered():
    a = subsample(100, 10, seed=0)
    assert a == sorted(a) and len(set(a)) == 10 and a == subsample(100, 10, seed=0)
    assert a != subsample(100, 10, seed=1)
    assert subsample(5, 10, seed=0) == [0, 1, 2, 3, 4] and subsample(5, None, seed=0) == [0, 1, 2, 3, 4]
    with pytest.raises(EvalDataError):
        subsample(5, 0, seed=0)


def test_bad_task_records(tmp_path):
    with pytest.raises(EvalDataError, match="label"):
        load_choice_items("sst2", write_jsonl(tmp_path / "a.jsonl", [{"sentence": "x", "label": 2}]))
    with pytest.raises(EvalDataError, match="answers"):
        load_choice_items("dialogue", write_jsonl(tmp_path / "b.jsonl", [dict(SAMPLES["dialogue"], answers="E")]))
    with pytest.raises(EvalDataError, match="4 strings"):
        load_choice_items("glue_mmlu", write_jsonl(tmp_path / "c.jsonl", [dict(SAMPLES["glue_mmlu"], choices=["1"])]))
    with pytest.raises(EvalDataError, match="unknown"):
        load_choice_items("squad", tmp_path / "a.jsonl")
    (tmp_path / "d.jsonl").write_text("{not json}\n")
    with pytest.raises(EvalDataError, match="line 1"):
        load_choice_items("sst2", tmp_path / "d.jsonl")
    assert set(CHOICE_TASKS) == set(SAMPLES)


def test_perplexity_matches_direct_computation(lm, tmp_path):
    text = " ".join(["The Eiffel Tower is located in Paris, the capital of France."] * 6)
    path = tmp_path / "wiki.txt"
    path.write_text(text)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:50]
    out = perplexity(lm, path, max_tokens=50, window=16, batch_size=2)
    nll, count = 0.0, 0
    for s in range(0, 50, 16):
        w = ids[s:s + 16]
        if len(w) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([w])).logits[0].double(), -1)
        nll -= float(logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
        count += len(w) - 1
    assert out["tokens"] == 50 and out["predicted_tokens"] == count
    assert out["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-9)
    assert out["chance"] == len(lm.tokenizer)
    with pytest.raises(EvalDataError, match="window"):
        perplexity(lm, path, window=1)


def test_known_facts_recall_matches_teacher_forced_greedy(lm, tmp_path):
    facts = [
        {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica", "prompt": "Vinson Massif is located in the continent of"},
        {"known_id": 1, "subject": "Beats Music", "attribute": "Apple", "prompt": "Beats Music is owned by"},
    ]
    # make fact 1 "known" by construction: its attribute is the model's own greedy continuation
    top = score_continuations(lm, [facts[1]["prompt"]], [" of"])[0]
    facts[1]["attribute"] = lm.tokenizer.decode([top.argmax_ids[0]]).strip()
    path = tmp_path / "known.json"
    path.write_text(json.dumps(facts))
    out = known_facts_recall(lm, path)
    expected = [score_continuations(lm, [f["prompt"]], [" " + f["attribute"]])[0].all_correct for f in facts]
    assert [it["recalled"] for it in out["items"]] == expected
    assert out["recall"] == pytest.approx(sum(expected) / 2)
    vocab = len(lm.tokenizer)
    lengths = [len(lm.tokenizer(" " + f["attribute"], add_special_tokens=False)["input_ids"]) for f in facts]
    assert out["chance"] == pytest.approx(sum(vocab ** -n for n in lengths) / 2)
    assert out["first_token_chance"] == 1 / vocab


def test_single_token_fast_path_equals_choice_by_choice(lm, tmp_path):
    rows = [dict(SAMPLES["glue_mmlu"], question=f"{i} + {i} =") for i in range(4)]
    items = load_choice_items("glue_mmlu", write_jsonl(tmp_path / "m.jsonl", rows))
    assert all(len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in items[0].choices)
    fast = score_choices(lm, items)
    for item, row in zip(items, fast):
        slow = [float(x.logprobs.mean()) for x in score_continuations(lm, [item.prompt] * 4, list(item.choices))]
        assert row == pytest.approx(slow, abs=1e-10)
