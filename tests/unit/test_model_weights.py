"""get_W / set_W / weights_sha256 on tiny random models of every family in the architecture table.

d_k (MLP width) differs from d_v (model width) in every model, so a transposed weight can
never pass for the right one.
"""

from __future__ import annotations

import pytest
import torch

from rlsedit.errors import NumericalError, StateMismatchError, UnsupportedError
from rlsedit.model.arch import ARCHITECTURES, get_architecture
from rlsedit.model.load import LoadedModel
from rlsedit.model.weights import down_proj, get_bias, get_W, set_W, weights_sha256
from tiny_models import GPT_LIKE, LLAMA_LIKE, loaded
from tiny_models import tiny_model as random_model

D_MODEL, D_MLP, N_LAYERS, VOCAB = 32, 48, 3, 64

EXTRA = {"gemma3_text": {"sliding_window": 16}, "gptj": {"rotary_dim": 4}}  # gemma3_text: head_dim 8
FAMILIES = sorted({**LLAMA_LIKE, **GPT_LIKE})


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    model = random_model(family, vocab=VOCAB, seed=seed, d_model=D_MODEL, d_mlp=D_MLP, n_layers=N_LAYERS,
                         max_positions=64, **EXTRA.get(family, {}))
    with torch.no_grad():  # GPT-2 initialises biases to zero; make them visible
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return loaded(model, None, family)


def test_every_table_family_is_tested():
    # The multimodal "gemma3" wrapper shares gemma3_text's down projection; every other
    # family in the table needs its own tiny model here.
    assert set(ARCHITECTURES) - {"gemma3"} == set(FAMILIES)


def test_unknown_model_type_is_refused():
    class Config:
        model_type = "no-such-family"

    with pytest.raises(UnsupportedError, match="no-such-family"):
        get_architecture(Config())


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_is_keys_by_values(family):
    lm = tiny_model(family)
    assert lm.d_k == D_MLP and lm.d_model == D_MODEL and lm.n_layers == N_LAYERS
    for layer in range(N_LAYERS):
        assert get_W(lm, layer).shape == (D_MLP, D_MODEL)


@pytest.mark.parametrize("family", FAMILIES)
def test_orientation_matches_the_forward(family):
    """``x @ W (+ b)`` must be what the down projection computes: v = Wᵀk, rows of x are keys."""
    lm = tiny_model(family)
    x = torch.randn(7, D_MLP)
    for layer in range(N_LAYERS):
        module = down_proj(lm, layer)
        with torch.no_grad():
            forward = module(x)
        bias = get_bias(lm, layer)
        expected = forward - bias if bias is not None else forward
        torch.testing.assert_close(x @ get_W(lm, layer), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_get_round_trip_and_forward(family):
    lm = tiny_model(family)
    layer = 1
    W_new = torch.randn(D_MLP, D_MODEL)
    set_W(lm, layer, W_new)
    assert torch.equal(get_W(lm, layer), W_new)
    x = torch.randn(5, D_MLP)
    with torch.no_grad():
        forward = down_proj(lm, layer)(x)
    bias = get_bias(lm, layer)
    torch.testing.assert_close(forward - (bias if bias is not None else 0), x @ W_new,
                               rtol=1e-5, atol=1e-5)
    # other layers untouched
    other = tiny_model(family)
    for l in (0, 2):
        assert torch.equal(get_W(lm, l), get_W(other, l))


@pytest.mark.parametrize("family", FAMILIES)
def test_get_W_is_a_copy(family):
    lm = tiny_model(family)
    W = get_W(lm, 0)
    W.add_(1.0)
    assert not torch.equal(get_W(lm, 0), W)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_W_refuses_wrong_shape_and_changes_nothing(family):
    lm = tiny_model(family)
    before = weights_sha256(lm)
    with pytest.raises(StateMismatchError, match=r"expected \(d_k, d_v\) = \(48, 32\)"):
        set_W(lm, 0, torch.randn(D_MODEL, D_MLP))  # the transpose
    with pytest.raises(StateMismatchError):
        set_W(lm, 0, torch.randn(D_MLP, D_MODEL + 1))
    assert weights_sha256(lm) == before


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_set_W_refuses_non_finite_and_changes_nothing(family, bad):
    lm = tiny_model(family)
    before = weights_sha256(lm)
    W = torch.randn(D_MLP, D_MODEL)
    W[3, 4] = bad
    with pytest.raises(NumericalError, match="non-finite"):
        set_W(lm, 2, W)
    assert weights_sha256(lm) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_sha256_tracks_weights(family):
    lm = tiny_model(family)
    original = get_W(lm, 0)
    h0 = weights_sha256(lm)
    assert weights_sha256(lm) == h0  # deterministic
    assert weights_sha256(tiny_model(family)) == h0  # same seed, same weights
    changed = original.clone()
    changed[0, 0] += 1e-3
    set_W(lm, 0, changed)
    h1 = weights_sha256(lm)
    assert h1 != h0
    set_W(lm, 0, original)
    assert weights_sha256(lm) == h0
    assert weights_sha256(tiny_model(family, seed=1)) != h0
