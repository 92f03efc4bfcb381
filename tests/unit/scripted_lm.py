"""A language model that greedily "generates" hand-written continuations, for generation tests.

Not a test module. :func:`scripted_lm` takes ``{prompt: continuation}`` and returns an object
with ``model``, ``tokenizer`` and ``device`` whose greedy decoding (through the project's real
batched, left-padded, KV-cached loop in :mod:`rlsedit.eval.scoring`) yields exactly those
continuations (space-separated words; a newline is its own token), then EOS. A prompt that is not in the script continues with EOS at once.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rlsedit.eval.scoring import encode_prompt
from tiny_models import word_tokenizer


class ScriptedModel(torch.nn.Module):
    """``next token = script[real tokens so far]`` (EOS when absent); the "cache" is the list of
    each row's real tokens, so the lookup sees the whole sequence at every step."""

    def __init__(self, script: dict[tuple[int, ...], int], vocab: int, eos: int) -> None:
        super().__init__()
        self.script, self.vocab, self.eos = script, vocab, eos
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False, past_key_values=None):
        if past_key_values is None:  # prefill: each row's real (unpadded) tokens
            rows = [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids, attention_mask)]
        else:  # one new column per row
            rows = [seq + [int(ids[-1])] for seq, ids in zip(past_key_values, input_ids)]
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for b, seq in enumerate(rows):
            logits[b, -1, self.script.get(tuple(seq), self.eos)] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=rows)


def scripted_lm(script: dict[str, str], *, chat_template: str | None = None, bos: bool = False):
    """An lm whose greedy continuation of each prompt of ``script`` is its text (word tokens)."""
    words = sorted({w for text in list(script) + list(script.values()) for w in text.replace("\n", " \n ").split()}
                   | {".", "\n", "<user>", "<assistant>"})
    tokenizer = word_tokenizer(words, bos=bos)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    eos = tokenizer.eos_token_id
    table: dict[tuple[int, ...], int] = {}
    for prompt, continuation in script.items():
        # continuation words by hand: the word tokenizer's pre-tokenizer would drop a newline
        p_ids = encode_prompt(tokenizer, prompt)
        c_ids = tokenizer.convert_tokens_to_ids(continuation.replace("\n", " \n ").split(" "))
        c_ids = [i for i, w in zip(c_ids, continuation.replace("\n", " \n ").split(" ")) if w]
        for k in range(len(c_ids) + 1):
            table[tuple(p_ids + c_ids[:k])] = c_ids[k] if k < len(c_ids) else eos
    return SimpleNamespace(model=ScriptedModel(table, len(tokenizer), eos), tokenizer=tokenizer,
                           device=torch.device("cpu"))
