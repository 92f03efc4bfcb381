"""Tiny randomly-initialised Hugging Face models and offline tokenizers, shared by the tests.

Not a test module: ``tests/unit`` and ``tests/reliability`` helpers and tests import it
(``tests/conftest.py`` puts this folder on ``sys.path``). Everything is built in memory;
nothing is downloaded.

Each caller passes the sizes, seed, tokenizer and finishing touches it has always used, so
numbers that tests compare stay as they were; the defaults are those of ``locate_tiny``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPTJConfig, LlamaConfig, MistralConfig,
                          PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config)

from rlsedit.model.arch import get_architecture
from rlsedit.model.load import LoadedModel

SENTENCES = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Toko Yasuda plays the guitar and the piano.",
    "Danielle Darrieux speaks French; her mother tongue is French.",
    "Autonomous University of Madrid, which is located in Spain.",
    "Therefore, because I said so, you will see it is a city in Sweden and Rome.",
    "Michael Jordan plays basketball and baseball in Chicago.",
]

# Families whose configs take Llama's argument names, and those that take GPT-2's.
LLAMA_LIKE = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma3_text": Gemma3TextConfig}
GPT_LIKE = {"gpt2": GPT2Config, "gptj": GPTJConfig}

# Special tokens of the word-level tokenizer, ids 0..3 (``<s>`` is 2).
WORD_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run tiny models on one thread: thread hand-offs cost more than d_model=32 math.

    Autouse in every module that imports it; the previous setting comes back afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fast_tokenizer(backend: Tokenizer, *, bos: str | None, bos_id: int | None, **special: str | None):
    """Wrap ``backend``; with ``bos_id`` every encoding starts with ``bos``. A special token
    given as None is left out entirely (not even recorded as null in tokenizer_config.json)."""
    if bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                   **{k: v for k, v in special.items() if v is not None})


def bpe_tokenizer(sentences=SENTENCES, *, bos: bool = False, pad: bool = True,
                  vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``sentences`` (GPT-2 style: a leading space belongs to the next
    word; any text tokenizes, bytes are the alphabet). Specials ``<eos>`` 0, ``<bos>`` 1 and,
    with ``pad``, ``<pad>`` 2; with ``bos`` every encoding starts with ``<bos>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<bos>"] + (["<pad>"] if pad else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(sentences) * 3, trainer=trainer)
    return _fast_tokenizer(tok, bos="<bos>", bos_id=tok.token_to_id("<bos>") if bos else None,
                           eos_token="<eos>", pad_token="<pad>" if pad else None)


def word_tokenizer(words, *, bos: bool = False, pad: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer: :data:`WORD_SPECIALS` then ``words``, unknown
    words become ``<unk>``. With ``bos`` every encoding starts with ``<s>`` (like Gemma /
    Llama 3); without ``pad`` there is no pad token (``load_model`` must add one)."""
    vocab = {w: i for i, w in enumerate(WORD_SPECIALS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return _fast_tokenizer(backend, bos="<s>", bos_id=vocab["<s>"] if bos else None, unk_token="<unk>",
                           pad_token="<pad>" if pad else None, eos_token="</s>")


def tiny_config(family: str, *, vocab: int, d_model: int = 32, d_mlp: int = 64, n_layers: int = 4, n_heads: int = 4,
                n_kv_heads: int = 2, max_positions: int = 256, **extra) -> PretrainedConfig:
    """The config of a tiny ``family`` model (a key of :data:`LLAMA_LIKE` or :data:`GPT_LIKE`);
    ``extra`` goes to the config class as is. Gemma 3 gets ``head_dim = d_model // n_heads``
    unless ``extra`` says otherwise (its default, 256, is far from tiny); GPT-2-like configs
    have no grouped key/value heads, so ``n_kv_heads`` does not apply to them."""
    if family in LLAMA_LIKE:
        if family == "gemma3_text":
            extra.setdefault("head_dim", d_model // n_heads)
        return LLAMA_LIKE[family](vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp,
                                  num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                  num_key_value_heads=n_kv_heads, max_position_embeddings=max_positions, **extra)
    if family in GPT_LIKE:
        return GPT_LIKE[family](vocab_size=vocab, n_embd=d_model, n_inner=d_mlp, n_layer=n_layers, n_head=n_heads,
                                n_positions=max_positions, **extra)
    raise ValueError(family)


def tiny_model(family: str = "llama", *, vocab: int, seed: int = 0, dtype: torch.dtype | None = None,
               attn: str | None = None, head_std: float | None = None, head_gain: float | None = None,
               frozen: bool = False, **config) -> PreTrainedModel:
    """A random tiny ``family`` model in eval mode, on CPU, from ``torch.manual_seed(seed)``.

    ``config`` holds the :func:`tiny_config` arguments. ``attn`` sets the attention
    implementation, ``dtype`` casts the weights after initialisation. Random init gives
    near-uniform logits; ``head_std`` rescales the output head to that standard deviation,
    ``head_gain`` multiplies it (sharper logits: optimisers have something to move, argmax and
    greedy decoding are far from ties). ``frozen`` turns gradients off.
    """
    cfg = tiny_config(family, vocab=vocab, **config)
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if dtype is not None:
        model.to(dtype)
    with torch.no_grad():
        head = model.lm_head.weight
        if head_std is not None:
            head.mul_(head_std / head.std())
        if head_gain is not None:
            head.mul_(head_gain)
    model.eval()
    if frozen:
        model.requires_grad_(False)
    return model


def loaded(model: PreTrainedModel, tokenizer, family: str, *, fingerprint: str = "0" * 64) -> LoadedModel:
    """``model`` and ``tokenizer`` as the :class:`LoadedModel` ``tiny-<family>`` on CPU."""
    return LoadedModel(model=model, tokenizer=tokenizer, spec=f"tiny-{family}", name=f"tiny-{family}",
                       fingerprint=fingerprint, arch=get_architecture(model.config), device=torch.device("cpu"))


def save(folder: Path, model: PreTrainedModel, tokenizer) -> Path:
    """``model`` and ``tokenizer`` saved as a Hugging Face directory (a valid ``--model`` spec)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
