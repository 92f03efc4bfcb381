"""On the real SmolLM2: RLSEdit with λ = 0 and sequential MEMIT (accumulated key Gram) give the
same edited weights at every batch of the same stream (float64 check, 1e-5 relative)."""

from __future__ import annotations

import pytest
import torch

from rlsedit.editors import MEMITSeq, RLSEdit
from rlsedit.editors.config import MEMITSeqConfig, RLSEditConfig
from rlsedit.locate.stats import second_moments
from rlsedit.model.load import load_model
from rlsedit.model.weights import get_W
from rlsedit.requests import read_requests

pytestmark = pytest.mark.integration


def test_rlsedit_lambda0_equals_memit_seq_on_smollm2(data_dir):
    lm = load_model("smollm2")
    layers = (5, 6)
    corpus = data_dir / "corpus" / "enwiki_pages_2MB.jsonl"
    stats = second_moments(lm, list(layers), corpus, max_tokens=20_000)
    moments = {l: stats[l].mom for l in layers}
    common = dict(layers=layers, v_num_grad_steps=10, mom2_n_samples=20_000)
    requests = read_requests(data_dir / "counterfact" / "counterfact-train.json", limit=6)
    rls = RLSEdit(lm, RLSEditConfig(lambda_reg=0.0, mu_reg=1.0, state_dtype="float64", **common), moments=moments)
    records = [rls.propose(batch).commit() for batch in (requests[:3], requests[3:])]
    W_rls = {l: rls.states_[l].W_.clone() for l in layers}

    rls.reset()  # back to W_0; MEMIT-seq replays the same keys and targets
    seq = MEMITSeq(lm, MEMITSeqConfig(**common), moments=moments, prefixes=rls.prefixes_)
    check = RLSEdit(load_model("smollm2"), RLSEditConfig(lambda_reg=0.0, state_dtype="float64", **common),
                    moments=moments, prefixes=rls.prefixes_)
    for record in records:
        seq.apply_record(record)
        check.apply_record(record)
        for l in layers:
            a = check.states_[l].W_
            b = get_W(seq.lm, l).double()
            rel = float((a.float().double() - b).norm() / a.norm())
            assert rel < 1e-5, f"layer {l}: rlsedit and memit-seq weights differ by {rel:.2e}"
    for l in layers:
        assert torch.equal(check.states_[l].W_, W_rls[l]), "replaying the journal must reproduce the live run"
