"""load_model: clear errors for bad specs, and loading a local Hugging Face directory."""

from __future__ import annotations

import re

import pytest
import torch

from rlsedit.errors import ModelLoadError, RLSEditError
from rlsedit.model.load import load_model
from rlsedit.model.weights import get_W, weights_sha256
from tiny_models import save, tiny_model, word_tokenizer

WORDS = "the a of is in and to capital france paris city river hello world".split()


def save_tiny_llama(path, seed=0):
    model = tiny_model("llama", vocab=32, seed=seed, d_model=16, d_mlp=24, n_layers=2, n_heads=2, n_kv_heads=1,
                       max_positions=32)
    save(path, model, word_tokenizer(WORDS, pad=False))  # no pad token: load_model must add one
    return model


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(str(missing), cache_dir=tmp_path / "cache")
    assert str(missing) in str(info.value)


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 10)
    with pytest.raises(ModelLoadError, match="could not load GGUF file") as info:
        load_model(str(bad), cache_dir=tmp_path / "cache")
    assert "broken.gguf" in str(info.value)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_directory_without_config(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.txt").write_text("nothing")
    with pytest.raises(ModelLoadError, match="has no config.json") as info:
        load_model(str(folder), cache_dir=tmp_path / "cache")
    assert "Hugging Face model directory" in str(info.value)


def test_directory_with_config_but_no_weights(tmp_path):
    folder = tmp_path / "half"
    save_tiny_llama(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="could not load model directory"):
        load_model(str(folder), cache_dir=tmp_path / "cache")


def test_unknown_hub_name_offline(tmp_path):
    spec = "no-such-org/no-such-model-rlsedit-test"
    with pytest.raises(ModelLoadError) as info:
        load_model(spec, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert spec in message
    assert "not reachable offline" in message
    assert "--model /path/to/model" in message  # tells the user what to do instead
    for name in ("smollm2", "gemma3-270m"):
        assert name in message
    assert isinstance(info.value, RLSEditError)


def test_local_directory_loads(tmp_path):
    folder = tmp_path / "tiny-llama"
    saved = save_tiny_llama(folder)
    lm = load_model(str(folder), cache_dir=tmp_path / "cache")
    assert lm.name == "tiny-llama" and lm.spec == str(folder)
    assert lm.arch.family == "llama"
    assert (lm.n_layers, lm.d_model, lm.d_k) == (2, 16, 24)
    assert re.fullmatch(r"[0-9a-f]{64}", lm.fingerprint)
    assert lm.tokenizer.pad_token_id is not None  # filled in from eos
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert torch.equal(get_W(lm, 1), saved.model.layers[1].mlp.down_proj.weight.detach().T)
    ids = lm.tokenizer("the capital of france", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = saved.eval()(ids).logits
        got = lm.model(ids).logits
    torch.testing.assert_close(got, expected)
    # An unknown model falls back to a band of lower-middle layers inside the model.
    assert all(0 <= layer < lm.n_layers for layer in lm.default_layers())


def test_local_directory_fingerprint_is_stable_and_tracks_weights(tmp_path):
    first = tmp_path / "a"
    save_tiny_llama(first, seed=0)
    lm1 = load_model(str(first), cache_dir=tmp_path / "cache")
    lm2 = load_model(str(first), cache_dir=tmp_path / "cache")
    assert lm1.fingerprint == lm2.fingerprint
    assert weights_sha256(lm1) == weights_sha256(lm2)
    other = tmp_path / "b"
    save_tiny_llama(other, seed=1)
    lm3 = load_model(str(other), cache_dir=tmp_path / "cache")
    assert lm3.fingerprint != lm1.fingerprint


def test_gemma_tokenizer_build_copies_are_dropped_and_it_still_encodes_and_saves(tmp_path):
    from transformers import AutoTokenizer
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    from rlsedit.model.load import _drop_build_copies

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "a": 5, "b": 6, "ab": 7, "▁": 8, "▁ab": 9}
    tok = GemmaTokenizer(vocab=dict(vocab), merges=[("a", "b"), ("▁", "ab")])
    before = tok("ab ab")["input_ids"]
    _drop_build_copies(tok)
    assert tok._vocab is None and tok._merges is None
    assert tok("ab ab")["input_ids"] == before and len(tok.get_vocab()) == len(vocab)
    tok.save_pretrained(tmp_path)  # export writes the tokenizer from its Rust object
    assert AutoTokenizer.from_pretrained(tmp_path)("ab ab")["input_ids"] == before


def test_other_tokenizers_keep_their_attributes():
    from rlsedit.model.load import _drop_build_copies

    class Other:
        _vocab = {"a": 0}
        _merges = [("a", "b")]

    other = Other()
    _drop_build_copies(other)
    assert other._vocab == {"a": 0} and other._merges == [("a", "b")]
