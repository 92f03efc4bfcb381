"""The model's own rewordings of a prompt as extra rows of the value target (``paraphrase_count``):
the checks a rewording must pass, the shared-head sampler against plain forwards, the choice by
next-token overlap, and the target rows they add (batched == per-request reference)."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import FAMILIES, make_lm, requests
from rlsedit.editors import RLSEdit
from rlsedit.editors.config import FTConfig, MEMITConfig, RLSEditConfig, ROMEConfig
from rlsedit.errors import InvalidRequestError
from rlsedit.locate import paraphrases as para
from rlsedit.locate.keys import BatchKeys, compute_keys, row_weights
from rlsedit.locate.targets import TargetConfig, _build_problem, compute_targets
from rlsedit.locate.targets_reference import compute_targets_reference
from rlsedit.locate.tokens import pad_left, pad_right, prompt_texts
from rlsedit.model.weights import get_W, weights_sha256
from rlsedit.requests import EditRequest

PREFIXES = ["{}", "The city is far away. {}", "Because I said so. {}"]
LAYER = 2
NO_STOP = TargetConfig(lr=0.5, steps=6, early_stop_loss=0.0, early_stop_nll=0.0, clamp_norm_factor=4.0)
REQUEST = EditRequest(id="x", prompt="{} spoke the language", subject="Michel Denisot", target_new="Russian",
                      target_true="French")


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    # the tiny tokenizer spends a token on most characters: the few-shot head needs the room,
    # also in Gemma's sliding window (4 in locate_tiny, to exercise it elsewhere)
    lm = make_lm(request.param, max_positions=1024)
    if request.param == "gemma3_text":
        lm.model.config.sliding_window = 1024
    return lm


@pytest.mark.parametrize("candidate, ok", [
    ("The language of Michel Denisot is", True),
    ("Michel Denisot speaks", True),
    ("Michel Denisot spoke the language", False),          # the prompt itself
    ("michel denisot  spoke the LANGUAGE", False),          # the prompt itself, up to case and spaces
    ("The language of Michel Denisot is Russian", False),  # names the new object
    ("Michel Denisot speaks french", False),               # names the old object
    ("Michel Denisot speaks Frenchy", True),                # a longer word is not the object
    ("Michel Denisot was born.", False),                    # ends a sentence
    ("The language of Denisot is", False),                  # lost the subject
    ("Michel Denisot and Michel Denisot speak", False),     # the subject twice
    ("Michel Denisot {} speaks", False),
    ("", False),
])
def test_a_rewording_must_keep_the_subject_and_name_no_object(candidate, ok):
    assert para.acceptable(candidate, REQUEST) is ok


def test_the_shared_head_gives_the_logits_of_the_whole_text(lm):
    # the head runs once and the queries follow it left-padded in the gap: the first sampled
    # token's logits must be those of head + query run as one unpadded text
    reqs = requests()
    logits, *_ = para._query_logits(lm, reqs)
    for i, r in enumerate(reqs):
        ids = lm.tokenizer(para._head(), add_special_tokens=True)["input_ids"] \
            + lm.tokenizer(para._query(r.text), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(logits[i], want, rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(lm):
    reqs = requests()
    state = torch.random.get_rng_state()
    a = para._sample_rewordings(lm, reqs, 3, 5, torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = para._sample_rewordings(lm, reqs, 3, 5, torch.Generator().manual_seed(1))
    assert a == b and len(a) == len(reqs) and all(len(x) == 3 for x in a)
    assert all("\n" not in text for texts in a for text in texts)


def test_the_rewordings_that_ask_for_the_same_answer_are_chosen_first(lm, monkeypatch):
    reqs = requests()[:2]
    good = [[f"Where is {reqs[0].subject} now", f"{reqs[0].subject} stands in", reqs[0].text, "no subject here"],
            [f"{reqs[1].subject} speaks", f"The tongue of {reqs[1].subject}", f"The tongue of {reqs[1].subject}"]]
    monkeypatch.setattr(para, "_sample_rewordings", lambda *args: good)
    got = para.paraphrase_templates(lm, reqs, 3, min_overlap=0.0)
    for r, cands, templates in zip(reqs, good, got):
        kept = list(dict.fromkeys(c for c in cands if para.acceptable(c, r)))
        probs = para._next_token_probs(lm, [r.text] + kept)
        overlap = (probs[1:] * probs[0]).sqrt().sum(dim=-1)      # Σ_v √(p_v q_v), computed apart
        ranked = [kept[j] for j in torch.argsort(overlap, descending=True, stable=True).tolist()]
        want = [c.replace(r.subject, "{}") for c in ranked][:3]
        assert templates == want + [r.prompt] * (3 - len(want))   # the own template fills up
    # a bar above every overlap keeps none: each request gets its own template only
    assert para.paraphrase_templates(lm, reqs, 2, min_overlap=1.0) == [[r.prompt] * 2 for r in reqs]


def test_templates_come_back_for_every_request_with_one_slot(lm):
    got = para.paraphrase_templates(lm, requests(), 2, samples=3, new_tokens=4)
    assert len(got) == 3 and all(len(t) == 2 and all(x.count("{}") == 1 for x in t) for t in got)
    assert got == para.paraphrase_templates(lm, requests(), 2, samples=3, new_tokens=4)
    assert para.paraphrase_templates(lm, requests(), 0) == [[], [], []]


@pytest.mark.parametrize("kwargs, match", [
    (dict(count=-1), "count"), (dict(count=1, samples=0), "samples"), (dict(count=1, min_overlap=2.0), "min_overlap"),
])
def test_bad_settings_are_refused(lm, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        para.paraphrase_templates(lm, requests(), **kwargs)


def test_a_context_or_window_too_short_for_the_prompt_is_named():
    with pytest.raises(InvalidRequestError, match="more than the model's context of 256"):
        para.paraphrase_templates(make_lm("gpt2", max_positions=256), requests(), 1)
    with pytest.raises(InvalidRequestError, match="more than the model's sliding attention window of 4"):
        para.paraphrase_templates(make_lm("gemma3_text", max_positions=1024), requests(), 1)


def test_rewording_rows_follow_the_prefix_rows():
    reqs = requests()[:2]
    extra = [["Where is {} now", "{} stands in"], ["{} speaks", "The tongue of {}"]]
    texts = [t.text for t in prompt_texts(reqs, PREFIXES, extra)]
    assert len(texts) == 2 * (len(PREFIXES) + 2)
    assert texts[3:5] == ["The city is far away. Where is The Eiffel Tower now",
                          "Because I said so. The Eiffel Tower stands in"]
    assert texts[5:8] == [t.text for t in prompt_texts(reqs[1:], PREFIXES)]
    assert texts[8] == "The city is far away. Danielle Darrieux speaks"
    assert prompt_texts(reqs, PREFIXES, [[], []]) == prompt_texts(reqs, PREFIXES)
    with pytest.raises(InvalidRequestError, match="same number"):
        prompt_texts(reqs, PREFIXES, [["{} a"], []])
    with pytest.raises(InvalidRequestError, match="exactly one"):
        prompt_texts(reqs, PREFIXES, [["no slot"], ["{} b"]])
    with pytest.raises(InvalidRequestError, match="1 lists for 2 requests"):
        prompt_texts(reqs, PREFIXES, [["{} a"]])


def test_rewording_rows_enter_the_loss_and_batched_equals_reference(lm):
    reqs = requests()
    extra = [["Where is {} now"], ["{} speaks"], ["Say {}"]]
    problem = _build_problem(lm, reqs, PREFIXES, NO_STOP.for_model(lm), extra)
    assert problem.n_prefixes == len(PREFIXES) + 1
    batched = compute_targets(lm, LAYER, reqs, PREFIXES, NO_STOP, paraphrases=extra)
    reference = compute_targets_reference(lm, LAYER, reqs, PREFIXES, NO_STOP, paraphrases=extra)
    assert batched.steps.tolist() == reference.steps.tolist()
    err = ((batched.z - reference.z).norm(dim=-1) / reference.z.norm(dim=-1)).max().item()
    assert err < 1e-4
    plain = compute_targets(lm, LAYER, reqs, PREFIXES, NO_STOP)
    assert not torch.allclose(plain.z, batched.z)                   # the rows change the target
    torch.testing.assert_close(plain.initial, batched.initial)      # h is still the bare prompt's


def test_the_editor_fits_targets_on_rewordings_and_keys_stay(monkeypatch):
    X = torch.randn(64, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moments = {l: X @ X.T / 400 for l in range(4)}
    config = RLSEditConfig(layers=(1, 2), context_count=1, v_num_grad_steps=4)
    calls = []
    # fixed rewordings: what the tiny random model samples rarely passes the checks (it would
    # fall back to the prompt itself), and this test is about what the editor does with them
    reworded = [["Where is {} now", "{} stands in"], ["{} speaks", "The tongue of {}"]]
    monkeypatch.setattr(para, "paraphrase_templates", lambda *a, **k: calls.append((a[2], k)) or reworded)
    lm = make_lm("llama", max_positions=1024)
    before = weights_sha256(lm.model)
    record = RLSEdit(lm, config.replace(paraphrase_count=2), moments=moments).propose(requests()[:2]).commit()
    assert calls == [(2, {"samples": 6, "seed": config.seed})]
    assert weights_sha256(lm.model) != before and all(torch.isfinite(get_W(lm, l)).all() for l in (1, 2))
    plain_lm = make_lm("llama", max_positions=1024)
    plain = RLSEdit(plain_lm, config, moments=moments).propose(requests()[:2]).commit()
    assert calls == [(2, {"samples": 6, "seed": config.seed})]      # off: never asked
    torch.testing.assert_close(record.tensors["layers.1.K"], plain.tensors["layers.1.K"])  # keys unchanged
    assert not torch.allclose(record.tensors["layers.2.V"], plain.tensors["layers.2.V"])   # targets changed
    assert config.replace(paraphrase_count=2).to_dict()["paraphrase_count"] == 2
    assert "paraphrase_count" not in config.to_dict()


def test_rewording_rows_weigh_as_a_third_type_in_the_key_average(lm):
    reqs = requests()
    extra = [["Where is {} now", "{} stands in"], ["{} speaks", "The tongue of {}"], ["Say {}", "{} plays"]]
    assert row_weights(PREFIXES).tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert row_weights(PREFIXES, 2).tolist() == pytest.approx([1 / 3, 1 / 6, 1 / 6, 1 / 6, 1 / 6])
    assert row_weights(PREFIXES[1:], 2).tolist() == pytest.approx([0.25] * 4)           # one prefix type
    assert row_weights(PREFIXES, 2, "uniform").tolist() == pytest.approx([0.2] * 5)
    # by hand: the keys of the prefix rows alone and of each rewording (behind its prefix) alone
    plain = compute_keys(lm, 1, reqs, PREFIXES)
    own = [compute_keys(lm, 1, [EditRequest(id=r.id, prompt=extra[i][j], subject=r.subject, target_new=r.target_new)
                                for i, r in enumerate(reqs)], [PREFIXES[(1 + j) % len(PREFIXES)]])
           for j in range(2)]
    torch.testing.assert_close(compute_keys(lm, 1, reqs, PREFIXES, paraphrases=extra),
                               2 / 3 * plain + (own[0] + own[1]) / 6, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(compute_keys(lm, 1, reqs, PREFIXES, paraphrases=extra), plain, atol=1e-3)
    torch.testing.assert_close(compute_keys(lm, 1, reqs, PREFIXES, paraphrases=[[], [], []]), plain)


def test_the_batch_key_reader_with_rewordings_equals_a_fresh_computation():
    lm = make_lm("llama", n_layers=5)
    reqs = requests()
    extra = [["Where is {} now"], ["{} speaks"], ["Say {}"]]
    prefixes = ["The city is far away. {}", "{}"]  # the bare prompt not first: hidden_at_top must find it
    reader = BatchKeys(lm, 1, 3, reqs, prefixes, paraphrases=extra, batch_size=2)
    for layer in (1, 3):
        torch.testing.assert_close(compute_keys(lm, layer, reqs, prefixes, reader=reader, paraphrases=extra),
                                   compute_keys(lm, layer, reqs, prefixes, paraphrases=extra), rtol=0, atol=1e-5)
    from rlsedit.locate.targets import hidden_at_subject
    torch.testing.assert_close(reader.hidden_at_top(), hidden_at_subject(lm, 3, reqs), rtol=0, atol=1e-5)
    with pytest.raises(InvalidRequestError, match="rewordings"):
        compute_keys(lm, 3, reqs, prefixes, reader=reader)                     # made with rewordings, asked without


def test_the_editor_averages_keys_over_rewordings_only_when_asked(monkeypatch):
    # a random tiny model's own rewordings are mostly the prompt itself (the fill-up), which
    # would leave the average as it was: fixed rewordings make the difference visible
    monkeypatch.setattr(para, "paraphrase_templates", lambda lm, reqs, k, samples, seed: [["Where is {} now", "Say {}"]] * len(reqs))
    X = torch.randn(64, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moments = {l: X @ X.T / 400 for l in range(4)}
    config = RLSEditConfig(layers=(1, 2), context_count=1, v_num_grad_steps=4, paraphrase_count=2)
    lm = make_lm("llama", max_positions=1024)
    targets_only = RLSEdit(lm, config, moments=moments).propose(requests()[:2]).commit()
    lm = make_lm("llama", max_positions=1024)
    with_keys = RLSEdit(lm, config.replace(paraphrase_keys=True), moments=moments).propose(requests()[:2]).commit()
    # the same rewordings (same seed, same model) in the targets; the keys move
    torch.testing.assert_close(with_keys.info["target_loss"], targets_only.info["target_loss"])
    assert not torch.allclose(with_keys.tensors["layers.1.K"], targets_only.tensors["layers.1.K"], atol=1e-4)
    assert config.replace(paraphrase_keys=True).to_dict()["paraphrase_keys"] is True
    assert "paraphrase_keys" not in config.to_dict()
    with pytest.raises(InvalidRequestError, match="paraphrase_count > 0"):
        RLSEditConfig(paraphrase_keys=True)
    with pytest.raises(InvalidRequestError, match="paraphrase_keys must be true or false"):
        RLSEditConfig(paraphrase_count=2, paraphrase_keys="yes")


def test_the_setting_is_checked_and_only_for_batch_key_value_editors():
    with pytest.raises(InvalidRequestError, match="paraphrase_count"):
        RLSEditConfig(paraphrase_count=-1)
    for config in (ROMEConfig, FTConfig):
        with pytest.raises(InvalidRequestError, match="paraphrase_count=2"):
            config(paraphrase_count=2)
    assert MEMITConfig(paraphrase_count=2).paraphrase_count == 2
    with pytest.raises(InvalidRequestError, match="paraphrase_samples=4 cannot yield paraphrase_count=8"):
        RLSEditConfig(paraphrase_count=8, paraphrase_samples=4)
    with pytest.raises(InvalidRequestError, match="paraphrase_samples"):
        RLSEditConfig(paraphrase_samples=0)
    assert "paraphrase_samples" not in RLSEditConfig(paraphrase_count=2).to_dict()
    assert RLSEditConfig(paraphrase_count=8, paraphrase_samples=12).to_dict()["paraphrase_samples"] == 12


def test_left_and_right_padding_put_the_same_tokens_at_opposite_ends():
    seqs = [[5, 6, 7], [8]]
    ids, mask = pad_left(seqs, 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_right(seqs, 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_left([(1, 2), []], 9)                 # any sequence; an empty row is all padding
    assert ids.tolist() == [[1, 2], [9, 9]] and mask.tolist() == [[1, 1], [0, 0]]
    ids, mask = pad_right([[4], [], [1, 2, 3]], 9)
    assert ids.tolist() == [[4, 9, 9], [9, 9, 9], [1, 2, 3]] and mask.tolist() == [[1, 0, 0], [0, 0, 0], [1, 1, 1]]
