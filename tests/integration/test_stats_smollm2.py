"""Corpus second moments of the real SmolLM2 on a slice of the Wikipedia corpus (small budget)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rlsedit.locate.stats import collect_second_moments, iter_token_pieces
from rlsedit.locate.stats_files import load_stats_file
from rlsedit.model.hooks import capture
from rlsedit.model.load import load_model
from rlsedit.model.weights import down_proj

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "corpus" / "enwiki_pages_2MB.jsonl"
LAYERS = [3, 7]
ARGS = dict(max_tokens=1024, seq_len=128, batch_tokens=500)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def corpus():
    if not CORPUS.is_file():
        pytest.skip(f"corpus {CORPUS} not present (the shared data folder sits beside the repository)")
    return CORPUS


def test_second_moments_on_wikipedia(smollm2, corpus, tmp_path):
    first = collect_second_moments(smollm2, LAYERS, corpus, cache_dir=tmp_path, **ARGS)
    # Reference: each 128-token piece alone, keys straight from the down projections.
    keys = {l: [] for l in LAYERS}
    for piece in iter_token_pieces(smollm2.tokenizer, corpus, seq_len=128, max_tokens=1024):
        with capture(down_proj(smollm2, 3)) as k3, capture(down_proj(smollm2, 7)) as k7, torch.no_grad():
            smollm2.model(input_ids=torch.tensor([piece]), logits_to_keep=1)
        keys[3].append(k3[0][0])
        keys[7].append(k7[0][0])
    for layer in LAYERS:
        result = first[layer]
        mom = result.moment.mom
        assert not result.cached and result.moment.count == 1024
        assert mom.shape == (smollm2.d_k, smollm2.d_k) and mom.dtype == torch.float64
        assert torch.equal(mom, mom.T)
        eig = torch.linalg.eigvalsh(mom)
        assert float(eig[0]) > -1e-12 * float(eig[-1])
        K = torch.cat(keys[layer]).double()  # (1024, d_k)
        reference = K.T @ K / K.shape[0]
        assert float((mom - reference).abs().max() / reference.abs().max()) < 1e-4
    again = collect_second_moments(smollm2, LAYERS, corpus, cache_dir=tmp_path, **ARGS)
    for layer in LAYERS:
        assert again[layer].cached
        assert torch.equal(again[layer].moment.mom, first[layer].moment.mom)


def test_memit_file_round_trip(smollm2, corpus, tmp_path):
    moment = collect_second_moments(smollm2, [3], corpus, use_cache=False, **ARGS)[3].moment
    path = tmp_path / "model.layers.3.mlp.down_proj_float64_mom2_100000.npz"
    np.savez(path, **{"mom2.mom2": moment.gram().numpy(), "mom2.count": np.array(moment.count)})
    loaded = load_stats_file(path, d_k=smollm2.d_k)
    assert loaded.count == moment.count
    torch.testing.assert_close(loaded.mom, moment.mom, rtol=1e-12, atol=1e-15)
