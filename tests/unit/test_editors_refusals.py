"""The solver's numerical policy protects the library path: an editor used without a Session
refuses an ill-conditioned batch (rlsedit.solvers.rls) and changes nothing."""

from __future__ import annotations

import pytest
import torch
from locate_tiny import make_lm

import rlsedit.locate.keys as keys_module
from rlsedit.editors import RLSEdit, RLSEditConfig
from rlsedit.errors import NumericalError
from rlsedit.model.weights import get_W

LAYERS = (1, 2)
GOOD = {"id": "good", "prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "tennis"}
BAD = {"id": "bad", "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "French"}


def _moments(lm, n=400):
    X = torch.randn(lm.d_k, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {l: X @ X.T / n for l in range(lm.n_layers)}


def _scale_keys_of(monkeypatch, edit_id: str, scale: float) -> None:
    """compute_keys returns the column of ``edit_id`` times ``scale``: S = I + KᵀCK grows by scale²."""
    real = keys_module.compute_keys

    def scaled(lm, layer, requests, prefixes, **kwargs):
        K = real(lm, layer, requests, prefixes, **kwargs)  # (d_k, u)
        for column, request in enumerate(requests):
            if request.id == edit_id:
                K[:, column] *= scale
        return K

    monkeypatch.setattr(keys_module, "compute_keys", scaled)


def test_partial_fit_refuses_an_ill_conditioned_batch_and_changes_nothing(monkeypatch):
    lm = make_lm("llama")
    config = RLSEditConfig(layers=LAYERS, mom2_update_weight=10.0, context_count=1, v_num_grad_steps=2)
    editor = RLSEdit(lm, config, moments=_moments(lm))
    editor.partial_fit([GOOD])
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    state = {k: v.clone() for k, v in editor.state_dict().items()}
    W1 = get_W(lm, 1).clone()
    _scale_keys_of(monkeypatch, "bad", 1e12)
    with pytest.raises(NumericalError, match=r"^layer 1: update: S = I \+ K\^T C K has largest eigenvalue .* over "
                                             r"1/eps of torch\.float32 .*nothing was applied$"):
        editor.partial_fit([dict(GOOD, id="good2", target_new="golf"), BAD])
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert editor.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in editor.state_dict().items())
    assert editor.n_edits_ == 1 and list(editor.live_) == ["good"]
    # the editor goes on: the same batch without the scaled key is applied
    monkeypatch.undo()
    editor.partial_fit([dict(GOOD, id="good2", target_new="golf")])
    assert editor.n_edits_ == 2 and not torch.equal(get_W(lm, 1), W1)
