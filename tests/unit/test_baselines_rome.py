"""ROME as its authors run it (issue 23, point 3): the right vector from the bare prompt's key,
ROME's 21 context prefixes, and the clamp and size term against the MLP output's norm."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import make_lm
from rlsedit.editors import ROME
from rlsedit.editors.config import ROMEConfig
from rlsedit.editors.rome import mlp_output_at_subject
from rlsedit.locate.prefixes import rome_context_prefixes
from rlsedit.locate.targets import hidden_at_subject
from rlsedit.model.weights import get_W
from rlsedit.requests import EditRequest

LAYER = 2
REQUEST = EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")


def _moments(lm, seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(lm.d_k, n, generator=g, dtype=torch.float64)
    return {l: X @ X.T / n for l in range(lm.n_layers)}


def test_the_bare_prompt_output_moves_by_exactly_delta():
    lm = make_lm("llama")
    editor = ROME(lm, ROMEConfig(layers=(LAYER,), v_num_grad_steps=5), moments=_moments(lm))
    h_before = hidden_at_subject(lm, LAYER, [REQUEST]).double()
    W0 = get_W(lm, LAYER).double()
    record = editor.propose([REQUEST]).commit()
    K, V = record.tensors[f"layers.{LAYER}.K"].double(), record.tensors[f"layers.{LAYER}.V"].double()
    delta = V - K.T @ W0  # (1, d_model): δ = v* − Wᵀk at the bare prompt's key
    assert float(delta.norm()) > 0
    # the edited block's output at the bare prompt's subject moves by exactly δ (no post-MLP norm here)
    moved = hidden_at_subject(lm, LAYER, [REQUEST]).double() - h_before
    torch.testing.assert_close(moved, delta, rtol=1e-4, atol=1e-4 * float(delta.norm()))
    # ... because the keys ROME constrains are the bare prompt's, not the prefix average
    K_mean = record.tensors[f"layers.{LAYER}.K_mean"].double()
    assert float((K_mean - K).norm()) > 1e-3 * float(K.norm())
    # replay from the record reproduces the weights
    lm2 = make_lm("llama")
    replay = ROME(lm2, ROMEConfig(layers=(LAYER,), v_num_grad_steps=5), moments=_moments(lm2),
                  prefixes=editor.prefixes_)
    replay.apply_record(record)
    assert torch.equal(get_W(lm2, LAYER), get_W(lm, LAYER))


def test_rome_uses_its_own_21_prefixes_and_uniform_key_average():
    lm = make_lm("llama")
    editor = ROME(lm, ROMEConfig(layers=(LAYER,)), moments=_moments(lm))
    assert len(editor.prefixes_) == 21 and editor.prefixes_[0] == "{}"
    assert all(p.endswith(". {}") and p.count("{}") == 1 for p in editor.prefixes_[1:])
    assert editor.prefixes_ == rome_context_prefixes(lm, ((5, 10), (10, 10)), seed=0)
    short = rome_context_prefixes(lm, ((5, 10),), seed=0)[1:]  # ≤ 4 sampled tokens after the start token
    assert all(len(lm.tokenizer(p[:-4], add_special_tokens=False)["input_ids"]) <= 6 for p in short)
    c = ROMEConfig.from_dict({"layers": [2], "clamp_norm_factor": 4, "v_weight_decay": 0.5, "mom2_adjustment": True,
                              "context_template_length_params": [[5, 10], [10, 10]], "v_loss_layer": 47})
    assert c == ROMEConfig(layers=(2,)) and c.key_average == "uniform" and c.clamp_norm_factor == 4.0
    with pytest.raises(ValueError, match="context_template_length_params"):
        ROMEConfig(context_template_length_params=((1, 3),))


def test_delta_is_clamped_against_the_mlp_output_norm():
    lm = make_lm("llama")
    factor = 0.05
    editor = ROME(lm, ROMEConfig(layers=(LAYER,), clamp_norm_factor=factor, v_num_grad_steps=4), moments=_moments(lm))
    m = mlp_output_at_subject(lm, LAYER, REQUEST).double()
    h = hidden_at_subject(lm, LAYER, [REQUEST]).double()
    assert abs(float(m.norm() - h.norm())) > 0.1 * float(m.norm())  # the two norms differ here
    W0 = get_W(lm, LAYER).double()
    record = editor.propose([REQUEST]).commit()
    K, V = record.tensors[f"layers.{LAYER}.K"].double(), record.tensors[f"layers.{LAYER}.V"].double()
    delta = V - K.T @ W0
    # the target cannot be reached within so small a ball: δ ends on its boundary, factor·‖m‖
    assert float(delta.norm()) == pytest.approx(factor * float(m.norm()), rel=1e-3)


class _StubTokenizer:
    def __init__(self, vocab, bos, eos, adds_bos):
        self.vocab, self.bos_token_id, self.eos_token_id, self.adds_bos = vocab, bos, eos, adds_bos

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([self.bos_token_id] if self.adds_bos and add_special_tokens else []) + [7]}


def test_rome_prefixes_start_from_the_document_separator():
    from rlsedit.locate.prefixes import _document_start_id

    # GPT-2 / SmolLM2: <|endoftext|> (SmolLM2's BOS and EOS are chat tokens)
    assert _document_start_id(_StubTokenizer({"<|endoftext|>": 0, "<|im_start|>": 1}, 1, 2, False)) == 0
    # Gemma / Llama 3: the BOS the tokenizer puts first itself
    assert _document_start_id(_StubTokenizer({"<bos>": 2}, 2, 1, True)) == 2
    # neither: BOS, else EOS
    assert _document_start_id(_StubTokenizer({}, None, 5, False)) == 5
    assert _document_start_id(_StubTokenizer({}, None, None, False)) is None
