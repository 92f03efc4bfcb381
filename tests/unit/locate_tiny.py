"""Tiny randomly-initialised models (Llama, GPT-2, Gemma 3 text) and an offline byte-level
BPE tokenizer, wrapped as :class:`~rlsedit.model.load.LoadedModel` for the locate tests.

Not a test module: ``tests/unit/test_locate_*.py`` import it. Everything is built in
memory from a few sentences; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from rlsedit.model.arch import get_architecture
from rlsedit.model.load import LoadedModel
from rlsedit.requests import EditRequest

SENTENCES = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Toko Yasuda plays the guitar and the piano.",
    "Danielle Darrieux speaks French; her mother tongue is French.",
    "Autonomous University of Madrid, which is located in Spain.",
    "Therefore, because I said so, you will see it is a city in Sweden and Rome.",
    "Michael Jordan plays basketball and baseball in Chicago.",
]

FAMILIES = ("llama", "gpt2", "gemma3_text")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run tiny models on one thread: thread hand-offs cost more than d_model=32 math.

    Autouse in every module that imports it; the previous setting comes back afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: a leading space belongs to the next word)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>", "<bos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")


def make_lm(family: str = "llama", *, seed: int = 0, n_layers: int = 4, max_positions: int = 256) -> LoadedModel:
    """A tiny random model of ``family`` (d_model 32, d_k 64) as a LoadedModel on CPU.

    The Gemma 3 model alternates sliding-window and full attention and uses a tokenizer
    that prepends ``<bos>``, so per-block arguments and special tokens are exercised.
    """
    tokenizer = make_tokenizer(bos=family == "gemma3_text")
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                             tie_word_embeddings=False, initializer_range=0.1)
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_inner=64, n_layer=n_layers, n_head=4,
                            n_positions=max_positions, initializer_range=0.1)
        model = GPT2LMHeadModel(config)
    elif family == "gemma3_text":
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=max_positions, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"] * (n_layers // 2),
                                  pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(family)
    with torch.no_grad():
        # Random init gives near-uniform logits; sharper ones make the target objective
        # non-trivial (the optimiser has something to move) without changing the math.
        head = model.lm_head.weight
        head.mul_(0.5 / head.std())
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=f"tiny-{family}", name=f"tiny-{family}",
                       fingerprint="0" * 64, arch=get_architecture(model.config), device=torch.device("cpu"))


def requests() -> list[EditRequest]:
    """Three requests with subjects of different token lengths and positions (two end their
    prompt, so even a random model's prediction there depends strongly on the edited state)."""
    return [
        EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
        EditRequest(id="b", prompt="The mother tongue of {}", subject="Danielle Darrieux", target_new="Swedish"),
        EditRequest(id="c", prompt="{}", subject="Toko Yasuda", target_new="guitar"),
    ]
