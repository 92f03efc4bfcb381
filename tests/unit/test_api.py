"""The library as a user picks it up: top-level names, an HF model in memory, a light
constructor, dict requests, editor-level undo and save_pretrained/from_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import rlsedit
from rlsedit import (EditRequest, InvalidRequestError, RLSEdit, RLSEditConfig, StateCorruptError, StateMismatchError,
                     UnsupportedError, load_model)
from rlsedit.editors import MEMIT
from rlsedit.model.weights import get_W
from tiny_models import SENTENCES, bpe_tokenizer, tiny_model

CONFIG = dict(layers=(1, 2), mom2_update_weight=10.0, context_count=1, v_num_grad_steps=6, mom2_n_samples=400)
EIFFEL = {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}
JORDAN = {"prompt": "{} plays", "subject": "Michael Jordan", "target_new": "baseball"}
DARRIEUX = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "French"}


def hf_model(seed: int = 0):
    """A transformers model and tokenizer as a user holds them (not a LoadedModel)."""
    tokenizer = bpe_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), seed=seed, initializer_range=0.1, head_std=0.5,
                       tie_word_embeddings=False)
    return model, tokenizer


def weights(lm) -> dict[int, torch.Tensor]:
    return {l: get_W(lm, l) for l in CONFIG["layers"]}


def test_import_rlsedit_is_light_and_exports_the_public_names():
    code = ("import sys, rlsedit; assert 'torch' not in sys.modules, 'import rlsedit pulled torch'; "
            "print(' '.join(rlsedit.__all__))")
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    for name in ("RLSEdit", "RLSEditConfig", "EditRequest", "Session", "load_model", "MEMIT", "AlphaEdit"):
        assert name in names
        assert getattr(rlsedit, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        rlsedit.Nope  # noqa: B018


def test_import_rlsedit_sizes_onednn_primitive_cache_unless_the_user_did():
    code = "import os, rlsedit; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert ours.stdout.strip() == rlsedit.ONEDNN_PRIMITIVE_CACHE
    assert int(rlsedit.ONEDNN_PRIMITIVE_CACHE) > 1024  # oneDNN's default, too small for a stream's shapes
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"})
    assert theirs.stdout.strip() == "512"


def test_the_readme_example_on_a_model_in_memory(tmp_path):
    model, tokenizer = hf_model()
    lm = load_model(model, tokenizer)
    assert lm.model is model and len(lm.fingerprint) == 64
    editor = RLSEdit(lm, RLSEditConfig(mu_reg=1.0, **CONFIG), corpus=SENTENCES * 20)
    # the constructor only stored its arguments: no statistics, no W0, no prefixes yet
    assert not editor._prepared and "W0" not in editor.__dict__ and "prefixes_" not in editor.__dict__
    W0 = weights(lm)
    editor.partial_fit([EIFFEL])
    assert editor.n_edits_ == 1 and list(editor.live_) == ["0"]
    assert any(not torch.equal(W0[l], W) for l, W in weights(lm).items())
    editor.partial_fit(EditRequest(id="jordan", **JORDAN))  # one request, not a list
    editor.undo("0")
    assert list(editor.live_) == ["jordan"] and editor.n_edits_ == 1
    # undo is exact: the weights equal those of an editor that only ever took the second
    # batch's keys and targets (its record, as journaled), to float32 rounding of the update
    # (which moves with the thread count: 1.8e-5 of a 0.63 change at one thread)
    fresh = RLSEdit(load_model(*hf_model()), RLSEditConfig(mu_reg=1.0, **CONFIG), corpus=SENTENCES * 20)
    fresh.apply_record(editor.history_[1])
    for l in CONFIG["layers"]:
        change = float((get_W(fresh.lm, l) - W0[l]).abs().max())
        assert change > 0.01
        assert float((get_W(lm, l) - get_W(fresh.lm, l)).abs().max()) <= 1e-4 * change
    with pytest.raises(InvalidRequestError, match="no live edit with id '0'"):
        editor.undo("0")


def test_save_pretrained_and_from_pretrained_round_trip_bit_for_bit(tmp_path):
    model, tokenizer = hf_model()
    lm = load_model(model, tokenizer)
    editor = RLSEdit(lm, RLSEditConfig(**CONFIG), corpus=SENTENCES * 20)
    editor.partial_fit([EIFFEL, JORDAN])
    editor.save_pretrained(tmp_path / "edits")
    saved = json.loads((tmp_path / "edits" / "editor_config.json").read_text())
    assert saved["n_edits"] == 2 and saved["method"] == "rlsedit" and sorted(saved["live"]) == ["0", "1"]

    base_model, base_tok = hf_model()  # the same base model, unedited, in a new process's memory
    lm2 = load_model(base_model, base_tok)
    loaded = RLSEdit.from_pretrained(lm2, tmp_path / "edits")
    for l in CONFIG["layers"]:
        assert torch.equal(get_W(lm2, l), get_W(lm, l))
    assert (loaded.n_edits_, loaded.n_batches_, loaded.prefixes_) == (2, 1, editor.prefixes_)
    # the next step gives the same weights in both
    editor.partial_fit([DARRIEUX])
    loaded.partial_fit([DARRIEUX])
    for l in CONFIG["layers"]:
        assert torch.equal(get_W(lm2, l), get_W(lm, l))
    # and undo still works after loading (the history travelled with it)
    loaded.undo("1")
    assert sorted(loaded.live_) == ["0", "2"]


def test_from_pretrained_refuses_another_model_another_method_and_damage(tmp_path):
    lm = load_model(*hf_model())
    editor = RLSEdit(lm, RLSEditConfig(**CONFIG), corpus=SENTENCES * 20)
    editor.partial_fit([EIFFEL])
    editor.save_pretrained(tmp_path / "edits")
    with pytest.raises(StateMismatchError, match="was made on model"):
        RLSEdit.from_pretrained(load_model(*hf_model(seed=1)), tmp_path / "edits")
    with pytest.raises(StateMismatchError, match="holds a 'rlsedit' editor, not 'memit'"):
        MEMIT.from_pretrained(load_model(*hf_model()), tmp_path / "edits")
    state = tmp_path / "edits" / "editor_state.safetensors"
    state.write_bytes(state.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StateCorruptError, match="does not match its sha256"):
        RLSEdit.from_pretrained(load_model(*hf_model()), tmp_path / "edits")
    with pytest.raises(InvalidRequestError, match="holds no saved editor"):
        RLSEdit.from_pretrained(lm, tmp_path)


def test_bad_requests_and_unsupported_undo_change_nothing():
    lm = load_model(*hf_model())
    editor = MEMIT(lm, MEMIT.config_class(**CONFIG), corpus=SENTENCES * 20)
    W0 = weights(lm)
    with pytest.raises(InvalidRequestError, match="target_new"):
        editor.partial_fit([EIFFEL, {"prompt": "{} is", "subject": "x"}])
    with pytest.raises(InvalidRequestError, match="expected edit requests"):
        editor.partial_fit("The Eiffel Tower is in Rome")
    assert all(torch.equal(W0[l], W) for l, W in weights(lm).items()) and editor.n_edits_ == 0
    editor.partial_fit([EIFFEL])
    with pytest.raises(InvalidRequestError, match="already live"):
        editor.partial_fit([{"id": "0", **JORDAN}])
    with pytest.raises(UnsupportedError, match="only 'rlsedit' supports undo"):
        editor.undo("0")


def test_load_model_refuses_what_it_cannot_edit():
    model, tokenizer = hf_model()
    with pytest.raises(rlsedit.ModelLoadError, match="needs its tokenizer"):
        load_model(model)
    with pytest.raises(rlsedit.ModelLoadError, match="pass model.float"):
        load_model(model.to(torch.bfloat16), tokenizer)
