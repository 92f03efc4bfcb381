"""A tiny randomly-initialised llama and an offline byte-level BPE tokenizer for eval tests
(built by ``tests/tiny_models.py`` from the sentences below).

Not a test module: ``tests/unit/test_eval_*.py`` import it. Nothing is downloaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tiny_models import bpe_tokenizer, tiny_model

SENTENCES = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Toko Yasuda plays the guitar and the piano.",
    "Danielle Darrieux speaks French; her mother tongue is French.",
    "Wellington is a twin city of Sydney and Sheffield.",
    "Question: What is 2 + 3? Answer: 2 + 3 = 5.\n#### 5",
    "def add(a, b):\n    return a + b\n",
    "Review: a gripping story. Sentiment: positive. True or False? answer: True",
    # answer words of the multiple-choice tasks, repeated so that BPE makes them single tokens
    " A B C D True False Yes No positive negative" * 4,
]


def make_lm(*, dtype: torch.dtype = torch.float32, attn: str = "eager", seed: int = 0, bos: bool = False):
    """``SimpleNamespace(model, tokenizer, device)``: the attributes evaluation relies on. The
    tokenizer is byte-level BPE trained on :data:`SENTENCES`, with ``<eos>`` and ``<bos>`` but
    no pad token."""
    tokenizer = bpe_tokenizer(SENTENCES, bos=bos, pad=False)
    # random init gives near-uniform logits; sharpen them (head_gain) so argmax and greedy
    # decoding are far from ties and the comparisons test the padding, not rounding luck
    model = tiny_model("llama", vocab=len(tokenizer), seed=seed, dtype=dtype, attn=attn, head_gain=40.0, n_layers=2,
                       max_positions=2048, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                       pad_token_id=None, tie_word_embeddings=False)
    return SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
