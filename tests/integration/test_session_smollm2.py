"""The product on the real SmolLM2: stream CounterFact edits, undo one, reopen, export.

One module-scoped state directory is built once (20 edits, batches of 5) and the tests read it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rlsedit.editors import RLSEditConfig
from rlsedit.requests import read_requests, target_text
from rlsedit.session.session import Runtime, Session

pytestmark = pytest.mark.integration

CF = "../shared/data/counterfact/counterfact-train.json"
N_EDITS = 20


def _top1_is_target(lm, request) -> bool:
    ids = lm.tokenizer(request.text, return_tensors="pt")
    first = lm.tokenizer(target_text(request.target_new), add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = lm.model(**ids).logits[0, -1]
    return int(logits.argmax()) == first


@pytest.fixture(scope="module")
def edited(tmp_path_factory, repo_root):
    state = tmp_path_factory.mktemp("state")
    requests = read_requests(repo_root / CF, limit=N_EDITS)
    config = RLSEditConfig(mom2_n_samples=20_000)
    with Session.create(state, model="smollm2", method="rlsedit", config=config,
                        runtime=Runtime(corpus=str(repo_root / "../shared/data/corpus/enwiki_pages_2MB.jsonl"))) as s:
        before = {r.id: _top1_is_target(s.lm, r) for r in requests}
        report = s.edit(requests, batch_size=5)
        after = {r.id: _top1_is_target(s.lm, r) for r in requests}
        sha = s.status()["weights_sha256"]
    return {"state": state, "requests": requests, "before": before, "after": after, "report": report, "sha": sha}


def test_every_edit_becomes_the_argmax(edited):
    assert len(edited["report"].applied) == N_EDITS
    assert not any(edited["before"].values()), "CounterFact targets should not be the unedited argmax"
    missed = [k for k, ok in edited["after"].items() if not ok]
    assert not missed, f"edits whose target is not the argmax after editing: {missed}"


def test_fresh_process_reopens_to_the_same_weights(edited):
    out = subprocess.run([sys.executable, "-m", "rlsedit", "status", "--state", str(edited["state"]), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["weights_sha256"] == edited["sha"]


def test_export_matches_under_plain_transformers(edited, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with Session.open(edited["state"]) as s:
        s.export(tmp_path / "ckpt")
        prompts = [r.text for r in edited["requests"][:5]]
        ours = [int(s.lm.model(**s.lm.tokenizer(p, return_tensors="pt")).logits[0, -1].argmax()) for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        theirs = [int(model(**tok(p, return_tensors="pt")).logits[0, -1].argmax()) for p in prompts]
    assert ours == theirs


def test_undo_restores_one_and_keeps_the_rest(edited):
    victim = edited["requests"][3]
    with Session.open(edited["state"]) as s:
        s.undo(victim.id)
        assert not _top1_is_target(s.lm, victim), "the undone edit still answers with its new target"
        held = [r.id for r in edited["requests"] if r.id != victim.id and _top1_is_target(s.lm, r)]
        assert len(held) == N_EDITS - 1, f"only {len(held)} of {N_EDITS - 1} other edits held"
