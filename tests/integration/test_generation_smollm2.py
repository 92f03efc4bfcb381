"""Generation metrics on the real SmolLM2-135M-Instruct: 20 CounterFact edits in one batch.

The unedited model must (almost) never say the new, counterfactual objects; after editing,
generation success, generation locality and the chat answer's success are all computed.
"""

from __future__ import annotations

import time

import pytest
import torch

from rlsedit.editors import RLSEditConfig
from rlsedit.eval.generation import GenerationConfig, chat_prompt, evaluate_generation, paraphrase_kind_of_file
from rlsedit.requests import read_requests
from rlsedit.session.session import Runtime, Session

pytestmark = pytest.mark.integration

CF = "../shared/data/counterfact/counterfact-train.json"
CORPUS = "../shared/data/corpus/enwiki_pages_2MB.jsonl"
N_EDITS = 20


@pytest.fixture(scope="module")
def measured(tmp_path_factory, repo_root):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    requests = read_requests(repo_root / CF, limit=N_EDITS)
    config = GenerationConfig(paraphrase_kind=paraphrase_kind_of_file(repo_root / CF))
    state = tmp_path_factory.mktemp("genstate")
    with Session.create(state, model="smollm2", method="rlsedit", config=RLSEditConfig(mom2_n_samples=20_000),
                        runtime=Runtime(corpus=str(repo_root / CORPUS))) as s:
        t0 = time.perf_counter()
        before = evaluate_generation(s.lm, requests, config)
        # the unedited model's edit-prompt and neighbourhood continuations, from the run above
        pre = {n["prompt"]: n["generation"] for rec in before["records"] for n in rec["neighbours"]}
        pre |= {rec["edit"]["prompt"]: rec["edit"]["generation"] for rec in before["records"]}
        t1 = time.perf_counter()
        s.edit(requests, batch_size=N_EDITS)
        t2 = time.perf_counter()
        after = evaluate_generation(s.lm, requests, config, pre_edit=pre)
        print(f"generation {t1 - t0:.0f} s, edit {t2 - t1:.0f} s, generation {time.perf_counter() - t2:.0f} s")
        template = chat_prompt(s.lm.tokenizer, "Where is the Eiffel Tower?")
    return {"before": before, "after": after, "config": config, "template": template}


def test_the_unedited_model_does_not_say_the_new_objects(measured):
    before = measured["before"]["summary"]
    assert measured["config"].paraphrase_kind == "open"  # the MEND layout's rephrase prompts
    assert before["edit_begins"] <= 0.10
    assert before["chat_mentions"] is not None and before["chat_mentions"] <= 0.10
    assert before["neighbour_true_begins"] is not None


def test_generation_success_locality_and_chat_are_computed_after_editing(measured):
    after = measured["after"]
    s = after["summary"]
    counts = dict(after["counts"])
    answered = counts.pop("edits_answered_pre_edit")  # edit prompts the unedited model answered with the old object
    assert counts == {"edits": N_EDITS, "edits_total": N_EDITS, "paraphrases": N_EDITS,
                      "neighbours": N_EDITS, "chat": N_EDITS,
                      "portability": 0,  # the MEND layout has no generation_prompts
                      "paraphrases_answered_pre_edit": 0}  # open prompts: not scored by begins-with
    assert s["edit_answered_pre_edit"] == pytest.approx(answered / N_EDITS)  # every record has its old object
    for key in ("edit_begins", "edit_mentions", "old_begins", "open_mentions", "neighbour_unchanged",
                "neighbour_true_begins", "chat_mentions", "chat_begins"):
        assert s[key] is not None and 0.0 <= s[key] <= 1.0, (key, s[key])
    assert s["paraphrase_begins"] is None  # open prompts are scored by mentions only
    # edits written on the raw prompts reach raw generation far more often than the base rate
    assert s["edit_begins"] >= 0.5 > measured["before"]["summary"]["edit_begins"]
    assert len(after["samples"]) == 30 and {r["kind"] for r in after["samples"]} == {"edit", "open", "neighbour", "chat"}
    assert "<|im_start|>user" in measured["template"] and measured["template"].endswith("<|im_start|>assistant\n")
