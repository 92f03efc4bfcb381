"""Portability in the generation metrics: a ROME-layout record's generation prompts are asked,
and the continuation is scored for mentioning the new (and the old) target; records without
generation prompts contribute nothing."""

from __future__ import annotations

import json

from rlsedit.eval.generation import GenerationConfig, evaluate_generation, format_samples
from rlsedit.requests import EditRequest, parse_request
from scripted_lm import scripted_lm

ROME_RECORD = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "{} is in", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"},
                          "target_true": {"str": "Paris"}},
    "paraphrase_prompts": ["Where is The Eiffel Tower ? It is in"],
    "neighborhood_prompts": ["Madrid is in"],
    # ROME's lists repeat prompts: each is asked once
    "generation_prompts": ["The Eiffel Tower city is known for", "People near The Eiffel Tower speak",
                           "The Eiffel Tower city is known for", "The Eiffel Tower is visited by"],
}
YASUDA = EditRequest(id="y", prompt="{} plays the", subject="Toko Yasuda", target_new="piano", target_true="guitar")
SCRIPT = {
    "The Eiffel Tower is in": "Rome",
    "Where is The Eiffel Tower ? It is in": "Rome",
    "Madrid is in": "Spain",
    "Toko Yasuda plays the": "piano",
    # mentions the new target (not first), mentions only the old one, mentions neither
    "The Eiffel Tower city is known for": "pasta and the old Rome forum",
    "People near The Eiffel Tower speak": "French in Paris",
    "The Eiffel Tower is visited by": "many people",
}


def test_generation_prompts_are_scored_for_mentions():
    eiffel = parse_request(ROME_RECORD, 0)
    assert len(eiffel.generation_prompts) == 4  # the reader keeps the file's list as it is
    out = evaluate_generation(scripted_lm(SCRIPT), [eiffel, YASUDA], GenerationConfig(chat=False))
    rec, other = out["records"]
    assert [p["prompt"] for p in rec["portability"]] == [
        "The Eiffel Tower city is known for", "People near The Eiffel Tower speak", "The Eiffel Tower is visited by"]
    assert [p["new_mentions"] for p in rec["portability"]] == [True, False, False]
    assert [p["old_mentions"] for p in rec["portability"]] == [False, True, False]
    assert other["portability"] == []  # no generation prompts: nothing, not the edit prompt again
    s = out["summary"]
    assert s["portability_mentions"] == 1 / 3 and s["portability_old_mentions"] == 1 / 3
    assert out["counts"]["portability"] == 3
    assert "portability_begins" not in s  # begins-with is not meaningful on open text
    assert any(note.startswith("portability:") and "only mentions" in note for note in out["notes"])
    # the other kinds are scored as before
    assert s["edit_begins"] == 1.0 and s["paraphrase_begins"] == 1.0


def test_portability_rows_are_sampled_and_labelled():
    out = evaluate_generation(scripted_lm(SCRIPT), [parse_request(ROME_RECORD, 0)], GenerationConfig(chat=False))
    rows = [s for s in out["samples"] if s["kind"] == "portability"]
    assert len(rows) == 3
    by_prompt = {r["prompt"]: r for r in rows}
    assert by_prompt["The Eiffel Tower city is known for"]["verdict"] == "mentions (old: misses)"
    assert by_prompt["People near The Eiffel Tower speak"]["verdict"] == "misses (old: mentions)"
    assert by_prompt["The Eiffel Tower is visited by"]["target"] == "Rome"
    assert any("| portability |" in line for line in format_samples(out["samples"]))
    assert json.loads(json.dumps(out))["summary"] == out["summary"]


def test_no_generation_prompts_or_turned_off_gives_none():
    lm = scripted_lm(SCRIPT)
    out = evaluate_generation(lm, [YASUDA], GenerationConfig(chat=False))
    assert out["summary"]["portability_mentions"] is None and out["counts"]["portability"] == 0
    assert any("no record has generation prompts" in note for note in out["notes"])
    off = evaluate_generation(lm, [parse_request(ROME_RECORD, 0)], GenerationConfig(chat=False, portability=False))
    assert off["summary"]["portability_mentions"] is None and off["records"][0]["portability"] == []
    assert any("turned off" in note and note.startswith("portability") for note in off["notes"])
    assert off["settings"]["portability"] is False
