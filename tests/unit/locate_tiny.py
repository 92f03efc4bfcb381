"""Tiny randomly-initialised models (Llama, GPT-2, Gemma 3 text) with an offline byte-level
BPE tokenizer, wrapped as :class:`~rlsedit.model.load.LoadedModel` for the locate, editor
and bench tests (built by ``tests/tiny_models.py``).

Not a test module: ``tests/unit/test_locate_*.py`` import it. Nothing is downloaded.
"""

from __future__ import annotations

from rlsedit.model.load import LoadedModel
from rlsedit.requests import EditRequest
from tiny_models import SENTENCES, bpe_tokenizer, loaded, one_thread, tiny_model

__all__ = ["FAMILIES", "SENTENCES", "make_lm", "one_thread", "requests"]

FAMILIES = ("llama", "gpt2", "gemma3_text")


def make_lm(family: str = "llama", *, seed: int = 0, n_layers: int = 4, max_positions: int = 256) -> LoadedModel:
    """A tiny random model of ``family`` (d_model 32, d_k 64) as a LoadedModel on CPU.

    The Gemma 3 model alternates sliding-window and full attention and uses a tokenizer
    that prepends ``<bos>``, so per-block arguments and special tokens are exercised.
    """
    if family not in FAMILIES:
        raise ValueError(family)
    tokenizer = bpe_tokenizer(bos=family == "gemma3_text")
    extra = {"gpt2": {}, "llama": {"tie_word_embeddings": False},
             "gemma3_text": {"sliding_window": 4, "pad_token_id": tokenizer.pad_token_id,
                             "layer_types": ["sliding_attention", "full_attention"] * (n_layers // 2)}}[family]
    # sharper logits than the random init: the target objective is non-trivial (the
    # optimiser has something to move) without changing the math
    model = tiny_model(family, vocab=len(tokenizer), seed=seed, n_layers=n_layers, max_positions=max_positions,
                       initializer_range=0.1, head_std=0.5, frozen=True, **extra)
    return loaded(model, tokenizer, family)


def requests() -> list[EditRequest]:
    """Three requests with subjects of different token lengths and positions (two end their
    prompt, so even a random model's prediction there depends strongly on the edited state)."""
    return [
        EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
        EditRequest(id="b", prompt="The mother tongue of {}", subject="Danielle Darrieux", target_new="Swedish"),
        EditRequest(id="c", prompt="{}", subject="Toko Yasuda", target_new="guitar"),
    ]
