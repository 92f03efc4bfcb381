"""CounterFact metrics on a tiny random model, checked against direct computations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval_tiny_lm import make_lm
from rlsedit.errors import InvalidRequestError
from rlsedit.eval.consistency import REFERENCE_LABEL, ConsistencyReference, tfidf_cosine
from rlsedit.eval.counterfact import (counterfact_records, evaluate_counterfact, generation_prompts,
                                      neighborhood_predictions, probes, score_requests)
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.fluency import ngram_entropy, ngram_entropy_bits, text_ngram_entropy, word_tokens
from rlsedit.eval.scoring import score_continuations
from rlsedit.requests import EditRequest, parse_request, target_text

ROME_RECORD = {
    "case_id": 8,
    "requested_rewrite": {
        "prompt": "What is the twin city of {}? It is",
        "relation_id": "P190",
        "target_new": {"str": "Sheffield", "id": "Q42448"},
        "target_true": {"str": "Sydney", "id": "Q3130"},
        "subject": "Wellington",
    },
    "paraphrase_prompts": ["... The twin city of Wellington is", "Wellington is a twin city of"],
    "neighborhood_prompts": ["Milan is a twin city of", "The twin city of Seoul is", "The twin city of Paris is"],
    "generation_prompts": ["Wellington's twin city is known for", "People in Wellington's twin city speak"],
}
MEND_RECORD = {
    "case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
    "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
    "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar and the piano",
}


@pytest.fixture(scope="module")
def lm():
    return make_lm(dtype=torch.float64, attn="sdpa")


def nll(lm, prompt, target):
    return score_continuations(lm, [prompt], [target_text(target)])[0]


def test_probes_follow_both_layouts():
    rome = parse_request(ROME_RECORD)
    groups = [p.group for p in probes(rome, 0)]
    assert groups == ["rewrite"] + ["paraphrase"] * 2 + ["neighborhood"] * 3
    neigh = [p for p in probes(rome, 0) if p.group == "neighborhood"]
    assert all(p.good == "Sydney" and p.bad == "Sheffield" for p in neigh)
    mend = parse_request(MEND_RECORD)
    (rw, para, loc) = probes(mend, 0)
    assert (rw.prompt, rw.good, rw.bad) == ("Toko Yasuda, the", "piano", "guitar")
    assert (para.group, para.prompt) == ("paraphrase", "Toko Yasuda is incredible at")
    # MEND layout: the locality prompt keeps its own ground truth, rival is the new object
    assert (loc.group, loc.good, loc.bad) == ("neighborhood", "guitar and the piano", "piano")
    assert generation_prompts(mend) == ("Toko Yasuda, the",)
    assert generation_prompts(rome) == tuple(ROME_RECORD["generation_prompts"])


def test_score_requests_matches_direct_computation(lm):
    reqs = [parse_request(ROME_RECORD), parse_request(MEND_RECORD, 1)]
    records = score_requests(lm, reqs, batch_size=3)
    for req, rec in zip(reqs, records):
        assert rec["id"] == req.id
        by_group = {}
        for p in probes(req, 0):
            good, bad = nll(lm, p.prompt, p.good), nll(lm, p.prompt, p.bad)
            by_group.setdefault(p.group, []).append((good, bad))
        for group, pairs in by_group.items():
            n = len(pairs)
            assert rec[f"{group}_count"] == n
            assert rec[f"{group}_success"] == pytest.approx(sum(g.mean_nll < b.mean_nll for g, b in pairs) / n)
            assert rec[f"{group}_margin"] == pytest.approx(sum(b.mean_nll - g.mean_nll for g, b in pairs) / n)
            assert rec[f"{group}_acc"] == pytest.approx(sum(g.token_accuracy for g, _ in pairs) / n)
            assert rec[f"{group}_exact"] == pytest.approx(sum(g.all_correct for g, _ in pairs) / n)


def test_missing_target_true_gives_none_not_zero(lm):
    req = EditRequest(id="x", prompt="{} plays the", subject="Toko Yasuda", target_new="piano",
                      paraphrases=("Toko Yasuda is good at",))
    rec = score_requests(lm, [req])[0]
    assert rec["rewrite_success"] is None and rec["paraphrase_success"] is None
    assert rec["rewrite_acc"] is not None
    assert rec["neighborhood_count"] == 0 and rec["neighborhood_acc"] is None


def test_summary_is_mean_over_requests_and_harmonic_score(lm):
    reqs = [parse_request(ROME_RECORD), parse_request(MEND_RECORD, 1)]
    out = evaluate_counterfact(lm, reqs)
    recs, summ = out["records"], out["summary"]
    assert summ["requests"] == 2
    for group, name in (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity")):
        assert summ[name] == pytest.approx((recs[0][f"{group}_success"] + recs[1][f"{group}_success"]) / 2)
        assert summ[f"{name}_acc"] == pytest.approx((recs[0][f"{group}_acc"] + recs[1][f"{group}_acc"]) / 2)
        assert 0.0 <= summ[name] <= 1.0
    parts = [summ["efficacy"], summ["generalization"], summ["specificity"]]
    expected = 0.0 if min(parts) == 0 else 3 / sum(1 / p for p in parts)
    assert summ["score"] == pytest.approx(expected)
    assert out["chance"]["efficacy"] == 0.5
    assert out["chance"]["efficacy_acc"] == pytest.approx(1 / len(lm.tokenizer))
    json.dumps(out)  # JSON-able


def test_records_scored_in_parts_give_the_evaluation_of_one_pass(lm):
    reqs = [parse_request(ROME_RECORD), parse_request(MEND_RECORD, 1)]
    reference = neighborhood_predictions(lm, reqs)
    whole = evaluate_counterfact(lm, reqs, pre_edit_locality=reference)
    parts = counterfact_records(lm, reqs[:1], pre_edit_locality=reference) + \
        counterfact_records(lm, reqs[1:], pre_edit_locality=reference)
    again = evaluate_counterfact(lm, reqs, pre_edit_locality=reference, records=json.loads(json.dumps(parts)))
    assert again["summary"] == pytest.approx(whole["summary"], rel=1e-9)
    assert again["summary"]["locality"] == 1.0 and again["notes"] == whole["notes"]
    with pytest.raises(EvalDataError, match="do not belong"):
        evaluate_counterfact(lm, reqs, records=parts[::-1])
    with pytest.raises(EvalDataError, match="without pre_edit_locality"):
        evaluate_counterfact(lm, reqs, pre_edit_locality=reference, records=counterfact_records(lm, reqs))


def test_fluency_and_consistency_records(lm, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    paragraphs = [
        "Sheffield is a city in South Yorkshire, England, famous for its steel industry and cutlery.",
        "Sydney is the capital city of New South Wales and the most populous city in Australia.",
        "The guitar is a fretted musical instrument that usually has six strings and a long neck.",
    ]
    corpus.write_text("\n".join(json.dumps({"title": str(i), "text": p}) for i, p in enumerate(paragraphs)))
    reference = ConsistencyReference.from_corpus(corpus, ["Sheffield", "piano"])
    reqs = [parse_request(ROME_RECORD), parse_request(MEND_RECORD, 1)]
    out = evaluate_counterfact(lm, reqs, fluency=True, consistency=reference, max_new_tokens=8,
                               keep_generations=True, decoding="greedy")
    rome, mend = out["records"]
    assert len(rome["generations"]) == 2 and len(mend["generations"]) == 1
    assert rome["generations"][0].startswith(ROME_RECORD["generation_prompts"][0])
    assert rome["fluency"] == pytest.approx(ngram_entropy(rome["generations"]))
    assert rome["consistency"] == pytest.approx(
        tfidf_cosine(reference.vectorizer, " ".join(rome["generations"]), paragraphs[0]))
    assert mend["consistency"] is None  # "piano" is never mentioned in the corpus
    assert out["summary"]["consistency_n"] == 1
    assert any(REFERENCE_LABEL in note for note in out["notes"])


def test_bad_inputs(lm):
    with pytest.raises(EvalDataError):
        evaluate_counterfact(lm, [])
    with pytest.raises(EvalDataError, match="decoding"):
        evaluate_counterfact(lm, [parse_request(MEND_RECORD)], fluency=True, decoding="beam")
    with pytest.raises(EvalDataError, match="group"):
        score_requests(lm, [parse_request(MEND_RECORD)], groups=("attribute",))
    bad = EditRequest(id="y", prompt="{} is", subject="A", target_new="B",
                      neighborhood=("C is", "D is"), neighborhood_answers=("E",))
    with pytest.raises(InvalidRequestError, match="answers"):
        score_requests(lm, [bad])


# --- fluency -----------------------------------------------------------------------------

def test_word_tokens():
    assert word_tokens("Paris's cafés, 2 euros!") == ["Paris", "'s", "cafés", ",", "2", "euros", "!"]


def test_ngram_entropy_closed_form():
    # tokens a b a b: bigrams {ab: 2, ba: 1}, trigrams {aba: 1, bab: 1}
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy_bits(["a", "b", "a", "b"], 2) == pytest.approx(h2)
    assert ngram_entropy_bits(["a", "b", "a", "b"], 3) == pytest.approx(1.0)
    assert text_ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert text_ngram_entropy("one") == 0.0  # no bigram at all
    assert ngram_entropy(["a b a b", "one"]) == pytest.approx(text_ngram_entropy("a b a b") / 2)


def test_repetition_lowers_fluency():
    varied = "The city lies on a river and its old port trades wool, steel and glass with many towns."
    repeated = "the city the city the city the city the city the city the city the city the city"
    assert text_ngram_entropy(varied) > text_ngram_entropy(repeated) + 1.0
    with pytest.raises(EvalDataError):
        ngram_entropy([])


# --- consistency -------------------------------------------------------------------------

def test_consistency_reference_whole_word_and_cap(tmp_path):
    corpus = tmp_path / "c.jsonl"
    texts = [
        "Paris is the capital of France and a centre of art, fashion and gastronomy in Europe.\nshort",
        "Parisian cafes are not about the city name as a whole word, so this must not match at all.",
        "Another paragraph about Paris and its museums, the Louvre and the Orsay among many others.",
    ]
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    ref = ConsistencyReference.from_corpus(corpus, ["Paris", "Rome"], max_paragraphs=5)
    assert ref.texts("Paris") == [texts[0].split("\n")[0], texts[2]]
    assert ref.texts("Rome") == [] and ref.similarity(["anything"], "Rome") is None
    capped = ConsistencyReference.from_corpus(corpus, ["Paris"], max_paragraphs=1)
    assert len(capped.texts("Paris")) == 1
    on_topic = ref.similarity(["Paris museums Louvre art capital of France"], "Paris")
    off_topic = ref.similarity(["quantum chromodynamics gluon lattice"], "Paris")
    assert 0.0 <= off_topic < on_topic <= 1.0


def test_consistency_bad_corpus(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        ConsistencyReference.from_corpus(tmp_path / "none.jsonl", ["x"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    with pytest.raises(EvalDataError, match="text"):
        ConsistencyReference.from_corpus(bad, ["x"])
