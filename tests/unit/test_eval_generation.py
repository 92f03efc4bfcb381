"""Generation metrics on a scripted model with hand-written continuations: the SQuAD normaliser,
begins-with vs mentions, stop strings and the token cap, identical-continuation locality, the
chat template (and its absence), the paraphrase kind of a file, the seeded edit sample."""

from __future__ import annotations

import json

import pytest

from rlsedit.eval.generation import (COLUMNS, ChatTemplateError, GenerationConfig, begins_with, chat_prompt,
                                     evaluate_generation, format_samples, mentions, normalize_answer,
                                     paraphrase_kind_of_file, pre_edit_generations, sample_positions, verdict)
from rlsedit.eval.datafiles import EvalDataError
from rlsedit.requests import EditRequest
from scripted_lm import scripted_lm

CHAT = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}<assistant>"
EIFFEL = EditRequest(id="e0", prompt="{} is in", subject="The Eiffel Tower", target_new="Rome", target_true="Paris",
                     paraphrases=("Where is The Eiffel Tower ? It is in",), neighborhood=("Madrid is in",),
                     neighborhood_answers=("Spain",))
YASUDA = EditRequest(id="e1", prompt="{} plays the", subject="Toko Yasuda", target_new="piano", target_true="guitar",
                     paraphrases=("The instrument of Toko Yasuda is the",), neighborhood=("John Lennon plays the",),
                     neighborhood_answers=("guitar",))
BEFORE = {"The Eiffel Tower is in": "Paris . It is old", "Where is The Eiffel Tower ? It is in": "Paris",
          "Madrid is in": "Spain \n and more", "Toko Yasuda plays the": "guitar and sings",
          "The instrument of Toko Yasuda is the": "guitar", "John Lennon plays the": "guitar"}
AFTER = {"The Eiffel Tower is in": "Rome . It is old", "Where is The Eiffel Tower ? It is in": "the city of Rome",
         "Madrid is in": "Spain \n and less", "Toko Yasuda plays the": "piano",
         "The instrument of Toko Yasuda is the": "bass", "John Lennon plays the": "piano"}


def _chat(script: dict[str, str], answers: dict[str, str]) -> dict[str, str]:
    """``script`` plus chat answers, keyed by the chat prompt the template makes of each question."""
    return {**script, **{f"<user> {q} <assistant>": a for q, a in answers.items()}}


def test_normaliser_is_squad():
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day; the END.") == "apple day end"
    assert normalize_answer("theatre") == "theatre"  # an article inside a word stays


def test_begins_with_and_mentions_are_whole_words():
    assert begins_with(" Paris, the capital", "paris") and begins_with("the Rome", "Rome")
    assert not begins_with("Parisian food", "Paris")  # a prefix of a word is not the word
    assert not begins_with("the city of Rome", "Rome") and mentions("the city of Rome", "Rome")
    assert begins_with("New York City", "new york") and not begins_with("New Jersey", "New York")
    assert not mentions("Romeo and Juliet", "Rome")
    assert not begins_with("anything", "the") and not mentions("the", "  ")  # an empty target never matches
    assert [verdict("Rome", "Rome"), verdict("in Rome", "Rome"), verdict("Milan", "Rome")] == \
        ["begins", "mentions", "misses"]


def test_stop_strings_eos_and_token_cap_cut_the_continuation():
    lm = scripted_lm({**AFTER, "A B": "x y z w v u"})
    out = evaluate_generation(lm, [EIFFEL], GenerationConfig(chat=False))
    rec = out["records"][0]
    assert rec["edit"]["generation"].strip() == "Rome"  # cut before "."
    assert rec["neighbours"][0]["generation"].strip() == "Spain"  # cut before the newline
    assert rec["edit"]["new_begins"] and not rec["edit"]["old_begins"]
    # the cap counts tokens: 3 of the 6 words; EOS ends the script's continuations early
    from rlsedit.eval.decoding import greedy_generate

    assert greedy_generate(lm, ["A B"], 3, stop=(".", "\n")) == ["x y z"]
    assert greedy_generate(lm, ["A B"], 12, stop=(".", "\n")) == ["x y z w v u"]


def test_locality_is_identical_continuations_before_and_after():
    before, after = scripted_lm(BEFORE), scripted_lm(AFTER)
    pre = pre_edit_generations(before, [EIFFEL, YASUDA], GenerationConfig(chat=False))
    assert pre == {"The Eiffel Tower is in": "Paris ", "Where is The Eiffel Tower ? It is in": "Paris",
                   "Madrid is in": "Spain ", "Toko Yasuda plays the": "guitar and sings",
                   "The instrument of Toko Yasuda is the": "guitar", "John Lennon plays the": "guitar"}
    out = evaluate_generation(after, [EIFFEL, YASUDA], GenerationConfig(chat=False), pre_edit=pre)
    # "Spain \n and less" is cut at the newline, so it equals the pre-edit "Spain"; "piano" != "guitar"
    assert [n["unchanged"] for r in out["records"] for n in r["neighbours"]] == [True, False]
    s = out["summary"]
    assert s["neighbour_unchanged"] == 0.5
    assert s["neighbour_true_begins"] == 0.5  # Madrid still says Spain; Lennon no longer says guitar
    assert s["edit_begins"] == 1.0 and s["old_begins"] == 0.0
    assert s["paraphrase_begins"] == 0.0  # "the city of Rome" mentions but does not begin with Rome
    assert s["paraphrase_mentions"] == 0.5 and s["open_mentions"] is None
    assert s["neighbour_first_word_unchanged"] == 0.5  # "Spain" stays; "guitar" became "piano"
    assert s["neighbour_new_mentions"] == 0.5 and s["neighbour_new_mentions_pre_edit"] == 0.0  # Lennon: piano
    # the unedited model: the old facts are said, the new ones are not
    base = evaluate_generation(before, [EIFFEL, YASUDA], GenerationConfig(chat=False), pre_edit=pre)
    assert base["summary"]["edit_begins"] == 0.0 and base["summary"]["old_begins"] == 1.0
    assert base["summary"]["neighbour_unchanged"] == 1.0
    # without pre-edit generations locality is not computed, and the notes say so
    none = evaluate_generation(after, [EIFFEL], GenerationConfig(chat=False))
    assert none["summary"]["neighbour_unchanged"] is None
    assert any("not computed" in note for note in none["notes"])


def test_late_drift_and_bleed_are_told_apart_from_a_changed_first_word():
    eiffel = EditRequest(id="e0", prompt="{} is in", subject="The Eiffel Tower", target_new="Rome",
                         neighborhood=("Berlin is in", "Vienna is in", "Bern is in"))
    before = {"Berlin is in": "Germany and more", "Vienna is in": "the heart of Austria", "Bern is in": "Rome"}
    after = {"Berlin is in": "Germany and Rome", "Vienna is in": "Heart of Austria", "Bern is in": "Rome"}
    pre = pre_edit_generations(scripted_lm(before), [eiffel], GenerationConfig(chat=False))
    out = evaluate_generation(scripted_lm(after), [eiffel], GenerationConfig(chat=False), pre_edit=pre)
    got = [(n["unchanged"], n["first_word_unchanged"], n["new_mentions"], n["pre_edit_new_mentions"])
           for n in out["records"][0]["neighbours"]]
    # late drift that says the new object; the same first word once normalised; said before the edit too
    assert got == [(False, True, True, False), (False, True, False, False), (True, True, True, True)]
    s = out["summary"]
    assert s["neighbour_unchanged"] == pytest.approx(1 / 3) and s["neighbour_first_word_unchanged"] == 1.0
    assert s["neighbour_new_mentions"] == pytest.approx(2 / 3)
    assert s["neighbour_new_mentions_pre_edit"] == pytest.approx(1 / 3)
    none = evaluate_generation(scripted_lm(after), [eiffel], GenerationConfig(chat=False))
    assert none["summary"]["neighbour_first_word_unchanged"] is None
    assert none["summary"]["neighbour_new_mentions_pre_edit"] is None
    assert none["summary"]["neighbour_new_mentions"] == pytest.approx(2 / 3)  # needs no pre-edit text


def test_paraphrases_the_unedited_model_did_not_answer_are_scored_apart():
    # "which stands in" draws a date from the unedited model, not the old object: it cannot tell
    # whether the fact moved, so the where-answered figures leave it out
    eiffel = EditRequest(id="e0", prompt="{} was built in", subject="The Eiffel Tower", target_new="Rome",
                         target_true="Paris", paraphrases=("Where is The Eiffel Tower ? It is in",
                                                           "The Eiffel Tower , which stands in"))
    nameless = EditRequest(id="e1", prompt="{} plays the", subject="Toko Yasuda", target_new="piano",
                           paraphrases=("The instrument of Toko Yasuda is the",))  # no old object
    before = {"The Eiffel Tower was built in": "1889", "Where is The Eiffel Tower ? It is in": "Paris",
              "The Eiffel Tower , which stands in": "1889 , was", "Toko Yasuda plays the": "guitar",
              "The instrument of Toko Yasuda is the": "guitar"}
    after = {"The Eiffel Tower was built in": "Rome", "Where is The Eiffel Tower ? It is in": "Rome",
             "The Eiffel Tower , which stands in": "a park", "Toko Yasuda plays the": "piano",
             "The instrument of Toko Yasuda is the": "piano"}
    pre = pre_edit_generations(scripted_lm(before), [eiffel, nameless], GenerationConfig(chat=False))
    out = evaluate_generation(scripted_lm(after), [eiffel, nameless], GenerationConfig(chat=False), pre_edit=pre)
    s, counts = out["summary"], out["counts"]
    assert [p["old_begins_pre_edit"] for r in out["records"] for p in r["paraphrases"]] == [True, False, None]
    assert s["paraphrase_begins"] == pytest.approx(2 / 3)            # all three paraphrases
    assert s["paraphrase_answered_pre_edit"] == 0.5                  # of the two with an old object
    assert s["paraphrase_begins_where_answered"] == 1.0 and counts["paraphrases_answered_pre_edit"] == 1
    assert s["edit_answered_pre_edit"] == 0.0 and s["edit_begins_where_answered"] is None  # "1889": not answered
    assert counts["edits_answered_pre_edit"] == 0
    none = evaluate_generation(scripted_lm(after), [eiffel], GenerationConfig(chat=False))
    assert none["summary"]["paraphrase_begins_where_answered"] is None
    assert none["summary"]["paraphrase_answered_pre_edit"] is None
    opened = evaluate_generation(scripted_lm(after), [eiffel], GenerationConfig(chat=False, paraphrase_kind="open"),
                                 pre_edit=pre)
    assert opened["summary"]["paraphrase_begins_where_answered"] is None  # open prompts: mentions only


def test_open_rephrases_report_mentions_only():
    out = evaluate_generation(scripted_lm(AFTER), [EIFFEL, YASUDA], GenerationConfig(chat=False, paraphrase_kind="open"))
    s = out["summary"]
    assert s["paraphrase_begins"] is None and s["paraphrase_mentions"] is None
    assert s["open_mentions"] == 0.5
    assert {p["kind"] for r in out["records"] for p in r["paraphrases"]} == {"open"}
    # their unedited text is never read, so it is not decoded
    pre = pre_edit_generations(scripted_lm(BEFORE), [EIFFEL, YASUDA], GenerationConfig(chat=False, paraphrase_kind="open"))
    assert set(pre) == {"The Eiffel Tower is in", "Madrid is in", "Toko Yasuda plays the", "John Lennon plays the"}


def test_chat_prompt_uses_the_template_and_a_missing_one_is_an_error():
    lm = scripted_lm(AFTER, chat_template=CHAT)
    assert chat_prompt(lm.tokenizer, "Where is it?") == "<user> Where is it? <assistant>"
    bare = scripted_lm(AFTER)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        chat_prompt(bare.tokenizer, "Where is it?")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        evaluate_generation(bare, [EIFFEL], GenerationConfig(chat=True))
    # chat=None measures chat only where a template exists, and says when it did not
    out = evaluate_generation(bare, [EIFFEL], GenerationConfig())
    assert out["summary"]["chat_mentions"] is None and out["counts"]["chat"] == 0
    assert any("no chat template" in note for note in out["notes"])


def test_a_template_bos_is_dropped_when_the_tokenizer_adds_one():
    template = "{{ bos_token }}" + CHAT
    with_bos = scripted_lm(AFTER, chat_template=template, bos=True)  # encoding adds <s> itself
    assert chat_prompt(with_bos.tokenizer, "Q ?") == "<user> Q ? <assistant>"
    without = scripted_lm(AFTER, chat_template=template, bos=False)
    assert chat_prompt(without.tokenizer, "Q ?") == "<s><user> Q ? <assistant>"


def test_chat_answers_are_scored_like_raw_ones():
    answers = {"The Eiffel Tower is in": "I think it is in Rome . Yes", "Toko Yasuda plays the": "The guitar"}
    lm = scripted_lm(_chat(AFTER, answers), chat_template=CHAT)
    out = evaluate_generation(lm, [EIFFEL, YASUDA], GenerationConfig())
    chats = [r["chat"] for r in out["records"]]
    assert [c["generation"].strip() for c in chats] == ["I think it is in Rome", "The guitar"]
    assert [c["new_mentions"] for c in chats] == [True, False]
    assert [c["old_mentions"] for c in chats] == [False, True]
    assert out["summary"]["chat_mentions"] == 0.5 and out["summary"]["chat_begins"] == 0.0
    assert out["counts"]["chat"] == 2


def test_samples_cover_every_kind_and_render():
    answers = {"The Eiffel Tower is in": "Rome", "Toko Yasuda plays the": "piano"}
    lm = scripted_lm(_chat(AFTER, answers), chat_template=CHAT)
    out = evaluate_generation(lm, [EIFFEL, YASUDA], GenerationConfig(samples=30))
    kinds = [s["kind"] for s in out["samples"]]
    assert len(kinds) == 8 and set(kinds) == {"edit", "paraphrase", "neighbour", "chat"}
    edit = next(s for s in out["samples"] if s["kind"] == "edit" and s["id"] == "e0")
    assert edit["verdict"] == "begins (old: misses)" and edit["target"] == "Rome"
    few = evaluate_generation(lm, [EIFFEL, YASUDA], GenerationConfig(samples=3))
    assert [s["kind"] for s in few["samples"]] == ["edit", "paraphrase", "neighbour"]
    table = format_samples(out["samples"])
    assert table[0].startswith("| kind | prompt |") and len(table) == 2 + 8
    assert json.loads(json.dumps(out))["summary"] == out["summary"]  # JSON-able
    assert {key for key, _ in COLUMNS} <= set(out["summary"])


def test_seeded_sample_of_edits():
    assert sample_positions(10, None, 0) == list(range(10)) == sample_positions(10, 20, 0)
    picked = sample_positions(100, 7, seed=3)
    assert picked == sorted(picked) and len(set(picked)) == 7 and picked == sample_positions(100, 7, seed=3)
    assert picked != sample_positions(100, 7, seed=4)
    out = evaluate_generation(scripted_lm(AFTER), [EIFFEL, YASUDA], GenerationConfig(n=1, seed=0, chat=False))
    assert out["counts"] == {"edits": 1, "edits_total": 2, "paraphrases": 1, "neighbours": 1, "portability": 0,
                             "chat": 0, "edits_answered_pre_edit": 0, "paraphrases_answered_pre_edit": 0}
    assert out["records"][0]["position"] == sample_positions(2, 1, 0)[0]


def test_paraphrase_kind_follows_the_file_layout(tmp_path):
    mend = {"case_id": 0, "prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano",
            "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at"}
    rome = {"case_id": 1, "requested_rewrite": {"prompt": "{} plays", "subject": "X", "target_new": {"str": "a"},
                                                "target_true": {"str": "b"}}, "paraphrase_prompts": ["p"]}
    zsre = {"subject": "X", "src": "What does X make?", "alt": "a", "answers": ["b"], "rephrase": "X makes what?"}
    kinds = {}
    for name, record in (("mend", mend), ("rome", rome), ("zsre", zsre)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([record]))
        kinds[name] = paraphrase_kind_of_file(path)
    assert kinds == {"mend": "open", "rome": "paraphrase", "zsre": "paraphrase"}


def test_bad_settings_are_refused():
    with pytest.raises(EvalDataError, match="paraphrase_kind"):
        GenerationConfig(paraphrase_kind="rephrase")
    with pytest.raises(EvalDataError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(EvalDataError, match="n must"):
        GenerationConfig(n=0)
    with pytest.raises(EvalDataError, match="at least one"):
        evaluate_generation(scripted_lm(AFTER), [], GenerationConfig(chat=False))


def test_ask_chat_and_the_demo_verdict():
    from rlsedit.session.cli import _ask, _demo_verdict

    answers = {"The Eiffel Tower is in": "Rome . Yes"}
    lm = scripted_lm(_chat(AFTER, answers), chat_template=CHAT)
    assert _ask(lm, "The Eiffel Tower is in", 5, chat=True)["completion"] == "Rome . Yes"  # the chat script
    assert _ask(lm, "The Eiffel Tower is in", 5)["completion"] == "Rome . It is old"  # the raw prompt's script
    with pytest.raises(ChatTemplateError):
        _ask(scripted_lm(AFTER), "The Eiffel Tower is in", 5, chat=True)
    said = {"completion": " Rome, of course"}
    assert _demo_verdict("Rome", {"completion": " Paris"}, said).startswith("says it")
    assert _demo_verdict("Rome", said, {"completion": " the city of Rome"}).startswith("mentions")
    assert _demo_verdict("Rome", said, {"completion": " Paris"}).startswith("does NOT say")
    assert _demo_verdict(None, said, said) == "unchanged"
    assert _demo_verdict(None, said, {"completion": " x"}).startswith("CHANGED")


def test_a_target_holding_a_stop_string_is_noted():
    dotted = EditRequest(id="d", prompt="{} is in", subject="The Eiffel Tower", target_new="St . Louis")
    out = evaluate_generation(scripted_lm({"The Eiffel Tower is in": "St . Louis"}), [dotted], GenerationConfig(chat=False))
    assert out["summary"]["edit_begins"] == 0.0  # decoding stopped at "."
    assert any("cannot be said in full" in note and "St . Louis" in note for note in out["notes"])
