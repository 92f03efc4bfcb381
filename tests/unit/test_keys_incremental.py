"""BatchKeys: a batch's keys layer after edited layer, each block run once, equal to a fresh
compute_keys (and the top state to hidden_at_subject) on the model as it is at that moment."""

from __future__ import annotations

import pytest
import torch
from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import make_lm, requests

import rlsedit.locate.keys as keys_module
from rlsedit.editors import RLSEdit, RLSEditConfig
from rlsedit.errors import InvalidRequestError, UnsupportedError
from rlsedit.locate.keys import BatchKeys, compute_keys
from rlsedit.locate.targets import hidden_at_subject
from rlsedit.model.weights import get_W, set_W

FIRST, TOP = 1, 4
EDITED = (1, 2, 4)  # a gap (block 3 is carried through, never read)
PREFIXES = ["The city is far away. {}", "{}", "Because I said so. {}"]  # the bare prompt not first


def _write(lm, layer: int, seed: int) -> None:
    """What an editor does after reading layer ``layer``'s keys: a new W there."""
    W = get_W(lm, layer)
    noise = torch.randn(W.shape, generator=torch.Generator().manual_seed(seed))
    set_W(lm, layer, W + 0.5 * W.abs().mean() * noise)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("average", ["per_type", "uniform"])
@pytest.mark.parametrize("prefixes", [PREFIXES, PREFIXES[::2]], ids=["with_bare", "without_bare"])
def test_keys_follow_the_layers_written_between_reads(family, average, prefixes):
    lm = make_lm(family, n_layers=6)
    reqs = requests()
    reader = BatchKeys(lm, FIRST, TOP, reqs, prefixes, average=average, batch_size=2)  # chunks < 9 rows
    for step, layer in enumerate(EDITED):
        K = reader.keys(layer)
        assert K.shape == (lm.d_k, len(reqs)) and K.dtype == torch.float32
        torch.testing.assert_close(K, compute_keys(lm, layer, reqs, prefixes, average=average), rtol=0, atol=1e-5)
        torch.testing.assert_close(reader.hidden_at_top(), hidden_at_subject(lm, TOP, reqs), rtol=0, atol=1e-5)
        if step + 1 < len(EDITED):
            # the write must move the next layer's keys by far more than the tolerance, or the
            # comparison above could not tell a reader that ignores writes
            above = EDITED[step + 1]
            before = compute_keys(lm, above, reqs, prefixes, average=average)
            _write(lm, layer, seed=step)
            assert (compute_keys(lm, above, reqs, prefixes, average=average) - before).abs().max() > 1e-3


def test_the_same_layer_twice_and_going_back():
    lm = make_lm("llama", n_layers=6)
    reader = BatchKeys(lm, FIRST, TOP, requests(), PREFIXES, batch_size=2)
    K = reader.keys(2)
    torch.testing.assert_close(reader.keys(2), K, rtol=0, atol=0)
    with pytest.raises(UnsupportedError, match="read up to block 2; block 1 is below it"):
        reader.keys(1)
    with pytest.raises(InvalidRequestError, match="above this reader's top layer 4"):
        reader.keys(5)
    with pytest.raises(InvalidRequestError, match="top layer 1 is below the first layer 2"):
        BatchKeys(lm, 2, 1, requests(), PREFIXES)


def test_compute_keys_refuses_a_reader_made_for_another_batch():
    lm = make_lm("llama")
    reader = BatchKeys(lm, 1, 2, requests(), PREFIXES)
    with pytest.raises(InvalidRequestError, match="made for another model, batch"):
        compute_keys(lm, 1, requests()[:2], PREFIXES, reader=reader)
    with pytest.raises(InvalidRequestError, match="made for another model, batch"):
        compute_keys(lm, 1, requests(), PREFIXES, average="uniform", reader=reader)
    torch.testing.assert_close(compute_keys(lm, 1, requests(), PREFIXES, reader=reader),
                               compute_keys(lm, 1, requests(), PREFIXES), rtol=0, atol=1e-5)


class _FreshKeys:
    """The editors' keys before BatchKeys: every layer's keys and the top state from the embedding."""

    def __init__(self, lm, first, top, requests, prefixes, *, average="per_type", **_):
        self.lm, self.top, self.requests, self.prefixes, self.average = lm, top, list(requests), prefixes, average

    def check_made_for(self, *_):
        pass

    def keys(self, layer):
        return compute_keys(self.lm, layer, self.requests, self.prefixes, average=self.average)

    def hidden_at_top(self):
        return hidden_at_subject(self.lm, self.top, self.requests)


def _moments(lm, n=400):
    X = torch.randn(lm.d_k, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {l: X @ X.T / n for l in range(lm.n_layers)}


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_an_editor_batch_keeps_its_keys_and_values(family, monkeypatch):
    config = RLSEditConfig(layers=(1, 3), context_count=2, v_num_grad_steps=2)
    batches = [requests()[:2], requests()[2:]]
    records, weights = {}, {}
    for path in ("fresh", "reader"):
        lm = make_lm(family)
        editor = RLSEdit(lm, config, moments=_moments(lm))
        with monkeypatch.context() as patch:
            if path == "fresh":
                patch.setattr(keys_module, "BatchKeys", _FreshKeys)
            records[path] = [editor.propose(batch).commit() for batch in batches]
        weights[path] = {l: get_W(lm, l) for l in config.layers}
    # Gemma 3's values come from an L-BFGS fit through its post-MLP norm (locate/postnorm.py),
    # which turns float32 rounding of the top state (~2e-7 relative) into ~3e-4 relative
    # differences of V (measured: jittering h by 2e-7 alone moves V as much)
    relative = {"V": 1e-5, "W": 1e-5} if family == "llama" else {"V": 1e-3, "W": 1e-3}
    for fresh, read in zip(records["fresh"], records["reader"]):
        assert fresh.tensors.keys() == read.tensors.keys()
        for name, tensor in fresh.tensors.items():
            tol = 1e-5 if name.endswith(".K") else relative["V"]
            torch.testing.assert_close(read.tensors[name], tensor, rtol=0, atol=tol * float(tensor.abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")
    for l, W in weights["fresh"].items():
        torch.testing.assert_close(weights["reader"][l], W, rtol=0, atol=relative["W"] * float(W.abs().max()))


# ---- PromptKeys: every position of the bare prompts ------------------------------------------------

def _every_position(lm, layer, reqs):
    """Each bare prompt's down-projection inputs at all its positions, one forward per prompt."""
    from rlsedit.locate.forward import read_module
    from rlsedit.locate.tokens import encode_at_subject, prompt_texts

    ids, _ = encode_at_subject(lm, prompt_texts(reqs, ["{}"]))
    module = keys_module.down_proj(lm, layer)
    return [read_module(lm, module, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long),
                        read="input")[0].float() for seq in ids]  # each (L_i, d_k)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_prompt_keys_are_every_position_and_follow_the_layers_written(family):
    lm = make_lm(family, n_layers=6)
    reqs = requests()
    lengths = [len(k) for k in _every_position(lm, FIRST, reqs)]
    width = max(lengths) - 1  # the longest prompt is cut, the shortest padded with zero columns
    assert min(lengths) < width
    reader = keys_module.PromptKeys(lm, FIRST, TOP, reqs, width, batch_size=2)
    for step, layer in enumerate(EDITED):
        got = reader.keys(layer)
        assert got.shape == (lm.d_k, len(reqs) * width) and got.dtype == torch.float32
        for i, want in enumerate(_every_position(lm, layer, reqs)):
            cols = got[:, i * width:(i + 1) * width].T  # (width, d_k), positions in order
            n = min(width, len(want))
            torch.testing.assert_close(cols[width - n:], want[len(want) - n:], rtol=0, atol=1e-5)
            assert not cols[:width - n].any()  # missing positions are zero columns
        if step + 1 < len(EDITED):
            _write(lm, layer, seed=step)


def test_prompt_keys_refuse_a_bad_width_and_going_back():
    lm = make_lm("llama", n_layers=6)
    with pytest.raises(InvalidRequestError, match="width must be >= 1"):
        keys_module.PromptKeys(lm, FIRST, TOP, requests(), 0)
    reader = keys_module.PromptKeys(lm, FIRST, TOP, requests(), 4)
    reader.keys(2)
    with pytest.raises(UnsupportedError, match="block 1 is below it"):
        reader.keys(1)
