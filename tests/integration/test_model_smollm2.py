"""The real embedded SmolLM2-135M-Instruct: loading, caching, fingerprint, a known fact.

Load times are logged (``-o log_cli=true`` shows them), never asserted: speed lives in
benchmarks, not tests.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from rlsedit.model.load import load_model
from rlsedit.model.weights import weights_sha256

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_first_and_cached_load_agree(smollm2, tmp_path):
    cache = tmp_path / "cache"
    start = time.perf_counter()
    first = load_model("smollm2", cache_dir=cache)  # dequantizes the GGUF into `cache`
    first_s = time.perf_counter() - start
    assert len(list((cache / "models").iterdir())) == 1
    start = time.perf_counter()
    again = load_model("smollm2", cache_dir=cache)  # reads the cached safetensors
    cached_s = time.perf_counter() - start
    log.info("SmolLM2 load: first %.1f s, cached %.2f s", first_s, cached_s)
    assert first.fingerprint == again.fingerprint
    assert weights_sha256(first) == weights_sha256(again)  # the cache is lossless
    # The fingerprint names the GGUF, not the cache it was dequantized into.
    assert first.fingerprint == smollm2.fingerprint
    assert len(first.fingerprint) == 64


def test_shape_of_the_model(smollm2):
    assert smollm2.arch.family == "llama"
    assert (smollm2.n_layers, smollm2.d_model, smollm2.d_k) == (30, 576, 1536)
    assert smollm2.model.dtype == torch.float32
    # the measured edit layers (docs/LAYERS.md), inside the model
    assert smollm2.default_layers() == (4, 5, 6, 7, 8)


def test_knows_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_the_embedded_file_given_by_path_gets_the_embedded_defaults(smollm2):
    """Same weights, same defaults: a path to the embedded GGUF is recognised by its sha256
    (a run once edited layers 3-7, the generic band, because the model came by path)."""
    from rlsedit.model.load import default_cache_dir, embedded_gguf

    path = embedded_gguf("smollm2", default_cache_dir())
    by_path = load_model(str(path))
    assert by_path.name != smollm2.name or by_path.spec != smollm2.spec
    assert by_path.fingerprint == smollm2.fingerprint
    assert by_path.default_layers() == smollm2.default_layers() == (4, 5, 6, 7, 8)
