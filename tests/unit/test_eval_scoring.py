"""Batched, padded scoring against a straightforward one-row-at-a-time computation."""

from __future__ import annotations

import copy

import pytest
import torch

from eval_tiny_lm import make_lm
from rlsedit.errors import NumericalError
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.decoding import greedy_generate, sample_generate
from rlsedit.eval.scoring import (
    ContinuationScore,
    continuation_logprobs,
    next_token_logprobs,
    next_token_topk,
    score_continuations,
)

PROMPTS = [
    "The Eiffel Tower is located in",
    "Toko Yasuda plays the",
    "Wellington is a twin city of",
    "Q",
    "Danielle Darrieux speaks French; her mother tongue is",
]
CONTS = [" Paris", " piano and the guitar", " Sheffield", " 5", " French"]


def reference_scores(lm, prompts, conts):
    """Unbatched, unpadded: full forward of prompt+continuation, read the target positions."""
    out = []
    for prompt, cont in zip(prompts, conts):
        p = lm.tokenizer(prompt)["input_ids"]
        c = lm.tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits, -1)[len(p) - 1:len(p) + len(c) - 1]
        out.append((logp[torch.arange(len(c)), torch.tensor(c)], logp.argmax(-1).tolist()))
    return out


def reference_greedy(lm, prompt, max_new_tokens):
    ids = lm.tokenizer(prompt)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            nxt = int(lm.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == lm.tokenizer.eos_token_id:
            break
        new.append(nxt)
    return lm.tokenizer.decode(new, skip_special_tokens=True)


# eager attention runs its softmax in float32 even for a float64 model, so padding-induced
# rounding there is ~1e-6 (logits are sharpened) rather than ~1e-15
@pytest.mark.parametrize(
    "attn,dtype,tol",
    [("eager", torch.float32, 1e-5), ("sdpa", torch.float32, 1e-5),
     ("eager", torch.float64, 1e-5), ("sdpa", torch.float64, 1e-10)],
)
@pytest.mark.parametrize("bos", [False, True])
def test_batched_logprobs_match_unbatched(attn, dtype, tol, bos):
    lm = make_lm(dtype=dtype, attn=attn, bos=bos)
    ref = reference_scores(lm, PROMPTS, CONTS)
    for batch_size in (1, 2, 5):
        got = score_continuations(lm, PROMPTS, CONTS, batch_size=batch_size)
        for (ref_lp, ref_arg), score in zip(ref, got):
            assert score.logprobs.shape == ref_lp.shape
            torch.testing.assert_close(score.logprobs.double(), ref_lp, atol=tol, rtol=0)
            assert list(score.argmax_ids) == ref_arg
    lps = continuation_logprobs(lm, PROMPTS, CONTS, batch_size=3)
    assert [len(x) for x in lps] == [len(r[0]) for r in ref]


def test_float32_close_to_float64():
    lm32 = make_lm(dtype=torch.float32)
    lm64 = copy.copy(lm32)
    lm64.model = copy.deepcopy(lm32.model).double()
    a = continuation_logprobs(lm32, PROMPTS, CONTS, batch_size=5)
    b = continuation_logprobs(lm64, PROMPTS, CONTS, batch_size=5)
    worst = max(float((x.double() - y).abs().max()) for x, y in zip(a, b))
    assert worst < 1e-4


def test_derived_scores():
    lm = make_lm(dtype=torch.float64)
    for score in score_continuations(lm, PROMPTS, CONTS):
        assert score.mean_nll == pytest.approx(float(-score.logprobs.mean()))
        hits = [a == t for a, t in zip(score.argmax_ids, score.token_ids)]
        assert score.token_accuracy == pytest.approx(sum(hits) / len(hits))
        assert score.all_correct == all(hits)
    half = ContinuationScore(token_ids=(1, 2, 3, 4), logprobs=torch.tensor([-1.0, -2.0, -3.0, -4.0]),
                             argmax_ids=(1, 9, 3, 9))
    assert (half.token_accuracy, half.all_correct, half.mean_nll) == (0.5, False, 2.5)
    full = ContinuationScore(token_ids=(5,), logprobs=torch.tensor([-0.1]), argmax_ids=(5,))
    assert full.all_correct and full.token_accuracy == 1.0


@pytest.mark.parametrize("attn,dtype", [("eager", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.float64)])
def test_greedy_batched_matches_unbatched(attn, dtype):
    lm = make_lm(dtype=dtype, attn=attn)
    got = greedy_generate(lm, PROMPTS, 12, batch_size=3)
    assert got == [reference_greedy(lm, p, 12) for p in PROMPTS]


def test_greedy_falls_back_when_padding_gives_nan(caplog):
    # eager attention on a float64 model turns a fully masked (left-pad) row into NaN
    lm = make_lm(dtype=torch.float64, attn="eager")
    with caplog.at_level("WARNING"):
        got = greedy_generate(lm, PROMPTS, 12, batch_size=5)
    assert "non-finite" in caplog.text
    assert got == [reference_greedy(lm, p, 12) for p in PROMPTS]


def test_broken_model_raises_numerical_error():
    lm = make_lm()
    with torch.no_grad():
        lm.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match="non-finite"):
        greedy_generate(lm, PROMPTS[:2], 4)
    with pytest.raises(NumericalError, match="non-finite"):
        score_continuations(lm, PROMPTS[:2], CONTS[:2])


def test_greedy_stop_strings_cut_text():
    lm = make_lm(dtype=torch.float64)
    full = greedy_generate(lm, PROMPTS, 12)
    for prompt, text in zip(PROMPTS, full):
        if len(text) < 3:
            continue
        stop = text[2:4]
        cut = greedy_generate(lm, [prompt], 12, stop=[stop])[0]
        assert cut == text[:text.find(stop)]


def test_next_token_topk_matches_reference():
    lm = make_lm(dtype=torch.float64)
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    top = next_token_topk(lm, PROMPTS[0], k=5)
    values, indices = logp.topk(5)
    assert [t.token_id for t in top] == indices.tolist()
    assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-12)
    assert top[0].text == lm.tokenizer.decode([top[0].token_id])


def test_sampling_is_seeded_and_topk_restricted():
    lm = make_lm(dtype=torch.float64)
    a = sample_generate(lm, PROMPTS, 8, top_k=5, seed=3)
    b = sample_generate(lm, PROMPTS, 8, top_k=5, seed=3)
    assert a == b
    # top_k=1 is greedy
    assert sample_generate(lm, PROMPTS, 8, top_k=1, seed=9) == greedy_generate(lm, PROMPTS, 8)


def test_training_flag_restored_and_no_grad():
    lm = make_lm()
    lm.model.train()
    score_continuations(lm, PROMPTS[:1], CONTS[:1])
    greedy_generate(lm, PROMPTS[:1], 2)
    assert lm.model.training
    assert all(p.grad is None for p in lm.model.parameters())


def test_bad_inputs_raise():
    lm = make_lm()
    with pytest.raises(EvalDataError, match="continuations"):
        score_continuations(lm, ["a", "b"], [" x"])
    with pytest.raises(EvalDataError, match="no tokens"):
        score_continuations(lm, ["a"], [""])
    with pytest.raises(EvalDataError, match="no tokens"):
        score_continuations(lm, [""], [" x"])
    with pytest.raises(EvalDataError, match="batch_size"):
        score_continuations(lm, ["a"], [" x"], batch_size=0)
    with pytest.raises(EvalDataError, match="max_new_tokens"):
        greedy_generate(lm, ["a"], 0)
    with pytest.raises(EvalDataError, match="context"):
        score_continuations(lm, ["word " * 3000], [" x"])
    with pytest.raises(EvalDataError, match="k must"):
        next_token_topk(lm, "a", k=0)


@pytest.mark.parametrize("attn,dtype,tol", [("sdpa", torch.float64, 1e-10), ("eager", torch.float32, 1e-5)])
def test_next_token_logprobs_equal_one_token_continuations(attn, dtype, tol):
    lm = make_lm(dtype=dtype, attn=attn)
    candidates = [[5, 17, 300], [2], [9, 9], [100, 101], [0, 399]]
    got = next_token_logprobs(lm, PROMPTS, candidates, batch_size=2)
    for prompt, cands, row in zip(PROMPTS, candidates, got):
        ids = lm.tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        torch.testing.assert_close(row.double(), logp[torch.tensor(cands)], atol=tol, rtol=0)
    with pytest.raises(EvalDataError):
        next_token_logprobs(lm, PROMPTS, candidates[:2])

