"""A tiny randomly-initialised llama and an offline byte-level BPE tokenizer for eval tests.

Not a test module: ``tests/unit/test_eval_*.py`` import it. Everything is built in memory
from a few sentences; nothing is downloaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: a leading space belongs to the next word)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def make_lm(*, dtype: torch.dtype = torch.float32, attn: str = "eager", seed: int = 0, bos: bool = False):
    """``SimpleNamespace(model, tokenizer, device)``: the attributes evaluation relies on."""
    tokenizer = make_tokenizer(bos=bos)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # random init gives near-uniform logits; sharpen them so argmax and greedy decoding are
    # far from ties and the comparisons below test the padding, not rounding luck
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.eval()
    return SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
