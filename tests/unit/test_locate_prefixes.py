"""Context prefixes: MEMIT's templates, seeded locally, memoised on the model object."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import make_lm
from rlsedit.locate.prefixes import STARTS, context_prefixes
from rlsedit.model.arch import resolve


@pytest.fixture(scope="module")
def lm():
    return make_lm("llama")


def test_layout_first_is_bare_then_generated(lm):
    prefixes = context_prefixes(lm, count=7, length=6, seed=0)
    assert prefixes[0] == "{}"
    assert len(prefixes) == 8
    for j, prefix in enumerate(prefixes[1:]):
        assert prefix.count("{}") == 1 and prefix.endswith(". {}"), prefix
        assert prefix.startswith(STARTS[j % len(STARTS)]), prefix  # starts cycle past five
        assert "\n" not in prefix


def test_length_counts_the_start_word(lm):
    # length 1 leaves no room after a one-token start; multi-token starts are kept whole
    prefixes = context_prefixes(lm, count=5, length=1, seed=0)
    assert prefixes == ["{}"] + [f"{start}. {{}}" for start in STARTS]


def test_count_zero_is_just_the_bare_prompt(lm):
    assert context_prefixes(lm, count=0) == ["{}"]


def test_deterministic_and_seed_dependent():
    a = context_prefixes(make_lm("llama"), count=5, length=8, seed=3)
    b = context_prefixes(make_lm("llama"), count=5, length=8, seed=3)  # a fresh object: no shared memo
    c = context_prefixes(make_lm("llama"), count=5, length=8, seed=4)
    assert a == b
    assert a != c


def test_memoised_per_model_and_arguments(lm):
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        first = context_prefixes(lm, count=2, length=5, seed=11)
        n_first = len(calls)
        again = context_prefixes(lm, count=2, length=5, seed=11)
        assert again == first and len(calls) == n_first  # served from lm.cache, model not run
        again.append("mutated")
        assert context_prefixes(lm, count=2, length=5, seed=11) == first  # callers get copies
        context_prefixes(lm, count=2, length=5, seed=12)
        assert len(calls) > n_first  # other arguments: generated anew
    finally:
        handle.remove()
    assert ("context_prefixes", 2, 5, 11) in lm.cache


def test_global_rng_untouched(lm):
    state = torch.get_rng_state()
    context_prefixes(lm, count=3, length=6, seed=21)
    assert torch.equal(state, torch.get_rng_state())


def test_braces_in_generations_are_removed():
    lm = make_lm("gpt2")
    brace = lm.tokenizer.convert_tokens_to_ids("{")
    assert brace is not None and brace != lm.tokenizer.unk_token_id

    def push_brace(_mod, _args, logits):
        logits = logits.clone()
        logits[..., brace] += 1e4  # every sampled token becomes "{"
        return logits

    handle = resolve(lm.model, lm.arch.lm_head).register_forward_hook(push_brace)
    try:
        prefixes = context_prefixes(lm, count=3, length=6, seed=0)
    finally:
        handle.remove()
    assert prefixes[1:] == [f"{start}. {{}}" for start in STARTS[:3]]  # braces gone, spaces collapsed


@pytest.mark.parametrize("kwargs", [{"count": -1}, {"length": 0}, {"seed": -2}, {"count": 1.5}, {"length": True}])
def test_bad_arguments(lm, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        context_prefixes(lm, **kwargs)
