"""Preservation rows (``preserve_count``): the edit's own template filled with other subjects,
their current layer output kept as extra least-squares targets (rlsedit.locate.preserve)."""

from __future__ import annotations

import json

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import make_lm
from rlsedit.editors import get_editor_class
from rlsedit.editors.config import EditConfig, FTConfig, RLSEditConfig, ROMEConfig
from rlsedit.errors import InvalidRequestError
from rlsedit.locate.preserve import clean_title, draw_subjects, load_subject_pool, preservation_requests
from rlsedit.locate.targets import hidden_at_subject
from rlsedit.locate.tokens import prompt_texts
from rlsedit.model.weights import get_W
from rlsedit.requests import EditRequest

REQUESTS = [EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(id="b", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="Swedish"),
            EditRequest(id="c", prompt="{} plays the", subject="Toko Yasuda", target_new="piano")]
LAYERS = (1, 2)
FAST = dict(layers=LAYERS, context_count=1, mom2_update_weight=10.0, v_num_grad_steps=8)


def _moments(lm, n=400):
    X = torch.randn(lm.d_k, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {l: X @ X.T / n for l in range(lm.n_layers)}


def _editor(method="rlsedit", lm=None, **config):
    lm = make_lm("llama") if lm is None else lm
    cls = get_editor_class(method)
    return cls(lm, cls.config_class(**{**FAST, **config}), moments=_moments(lm))


# ---- the pool and the draw ---------------------------------------------------------------------

def test_the_bundled_titles_are_cleaned():
    assert clean_title("Dark Angel (British TV series)") == "Dark Angel"
    assert clean_title("Thailand national football team results (1970-79)") == "Thailand national football team results"
    for dropped in ("List of football stadiums in Senegal", "October 25", "25 October", "1995", "March 2010", "1990s"):
        assert clean_title(dropped) is None, dropped
    assert clean_title("2012 Angola Cup") == "2012 Angola Cup"
    pool = load_subject_pool()
    assert len(pool) > 100 and len({p.casefold() for p in pool}) == len(pool)
    assert {"Dark Angel", "Stephen King", "Kerberos"} <= set(pool)
    assert not any(p.startswith("List of") or "(" in p or p == "October 25" for p in pool)


def test_a_user_file_of_each_kind(tmp_path):
    strings = tmp_path / "subjects.json"
    strings.write_text(json.dumps(["Paris", "Rome", "paris", " Madrid "]))
    assert load_subject_pool(strings) == ["Paris", "Rome", "Madrid"]  # deduplicated case-insensitively, stripped
    known = tmp_path / "known_1000.json"  # ROME's layout: records with a "subject" field, kept as they are
    known.write_text(json.dumps([{"known_id": 0, "subject": "Vinson Massif (x)", "prompt": "{} is located in"},
                                 {"known_id": 1, "subject": "Beats Music"}]))
    assert load_subject_pool(known) == ["Vinson Massif (x)", "Beats Music"]
    titles = tmp_path / "pages.jsonl"  # records with a "title" field, cleaned as the bundled ones
    titles.write_text("".join(json.dumps(r) + "\n" for r in
                              [{"title": "Dark Angel (British TV series)"}, {"title": "List of x"}, {"subject": "Oslo"}]))
    assert load_subject_pool(str(titles)) == ["Dark Angel", "Oslo"]
    strings.write_text(json.dumps(["List of things"]))  # strings and subjects are taken as they are
    assert load_subject_pool(strings) == ["List of things"]


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("[1, 2", "not valid JSON"),
    ('{"subject": "Paris"}', "expected a JSON list"),
    ('[{"name": "Paris"}]', "entry #0"),
    ("[]", "holds no usable subject"),
    ('["{}", "  "]', "holds no usable subject"),
])
def test_a_bad_subjects_file_is_refused(tmp_path, content, match):
    path = tmp_path / "subjects.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidRequestError, match=match):
        load_subject_pool(path)


def test_the_draw_is_deterministic_and_never_the_own_subject():
    pool = ["the eiffel tower", "Paris", "Rome", "Madrid", "Oslo", "Lima", "Quito", "Bern"]
    request = REQUESTS[0]
    seen = set()
    for seed in range(40):
        drawn = draw_subjects(pool, request, 7, seed)
        assert drawn == draw_subjects(list(pool), request, 7, seed)  # same pool, id and seed: same subjects
        assert len(set(drawn)) == 7 and "the eiffel tower" not in drawn  # own subject excluded, any case
        seen.add(tuple(drawn))
    assert len(seen) > 10  # the seed matters
    assert draw_subjects(pool, REQUESTS[1], 3, 0) != draw_subjects(pool, REQUESTS[0], 3, 0)  # so does the id
    with pytest.raises(InvalidRequestError, match="only 7 other subjects"):
        draw_subjects(pool, request, 8, 0)


def test_the_preservation_texts_are_the_request_template_with_other_subjects():
    pool = load_subject_pool()
    pseudo = preservation_requests(REQUESTS[:2], pool, 3, seed=5)
    assert [p.id for p in pseudo] == ["a#preserve0", "a#preserve1", "a#preserve2",
                                      "b#preserve0", "b#preserve1", "b#preserve2"]
    for request, group in ((REQUESTS[0], pseudo[:3]), (REQUESTS[1], pseudo[3:])):
        assert [p.subject for p in group] == draw_subjects(pool, request, 3, 5)
        for row in prompt_texts(group, ["{}"]):  # bare: no context prefix
            subject = row.text[row.start:row.end]
            assert row.text == request.prompt.replace("{}", subject) and subject in pool


# ---- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("preserve_count", -1, "preserve_count must be an integer >= 0"),
    ("preserve_count", True, "preserve_count must be an integer >= 0"),
    ("preserve_count", 2.0, "preserve_count must be an integer >= 0"),
    ("preserve_weight", 0.0, "preserve_weight must be a finite number > 0"),
    ("preserve_weight", float("nan"), "preserve_weight must be a finite number > 0"),
    ("preserve_subjects", 3, "preserve_subjects must be a file path or None"),
    ("preserve_subjects", " ", "preserve_subjects must be a file path or None"),
    ("preserve_positions", -1, "preserve_positions must be an integer >= 0"),
    ("preserve_positions", 4, "needs preservation prompts: set preserve_count > 0"),
])
def test_bad_config_values_are_refused(field, value, match):
    with pytest.raises(InvalidRequestError, match=match):
        EditConfig(**{field: value})


def test_methods_without_a_column_least_squares_refuse_it_and_defaults_are_not_saved():
    with pytest.raises(InvalidRequestError, match="ROME's rank-one update"):
        ROMEConfig(preserve_count=2)
    with pytest.raises(InvalidRequestError, match="FT fine-tunes"):
        FTConfig(preserve_count=2)
    assert ROMEConfig(preserve_count=0).preserve_count == 0
    assert not {"preserve_count", "preserve_weight", "preserve_subjects", "preserve_positions"} \
        & set(RLSEditConfig().to_dict())
    on = RLSEditConfig(preserve_count=4, preserve_weight=2, preserve_subjects="x.json", preserve_positions=8)
    assert on.preserve_weight == 2.0 and RLSEditConfig.from_dict(json.loads(json.dumps(on.to_dict()))) == on


def test_a_pool_too_small_or_a_missing_file_fails_before_anything_changes(tmp_path):
    small = tmp_path / "subjects.json"
    small.write_text(json.dumps(["Paris", "Rome", "Oslo"]))
    for subjects, match in ((small, "needs at least 4 distinct subjects"), (tmp_path / "none.json", "does not exist")):
        editor = _editor(preserve_count=3, preserve_subjects=str(subjects))
        W = {l: get_W(editor.lm, l) for l in LAYERS}
        with pytest.raises(InvalidRequestError, match=match):
            editor.partial_fit(REQUESTS[:1])
        assert all(torch.equal(get_W(editor.lm, l), W[l]) for l in LAYERS)


def test_a_resumed_editor_replays_without_the_subjects_file_and_needs_it_only_for_new_edits(tmp_path):
    subjects = tmp_path / "subjects.json"
    subjects.write_text(json.dumps(["Paris", "Rome", "Oslo", "Lima", "Bern"]))
    editor = _editor(preserve_count=2, preserve_subjects=str(subjects))
    record = editor.propose(REQUESTS[:1]).commit()
    subjects.unlink()  # moved away after the edit: the journal holds the rows
    lm = make_lm("llama")
    resumed = get_editor_class("rlsedit")(lm, editor.config, moments=_moments(lm), prefixes=editor.prefixes_)
    resumed.apply_record(record)
    assert all(torch.equal(get_W(lm, l), get_W(editor.lm, l)) for l in LAYERS)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        resumed.partial_fit(REQUESTS[1:2])
    assert all(torch.equal(get_W(lm, l), get_W(editor.lm, l)) for l in LAYERS)


# ---- the edit --------------------------------------------------------------------------------

def _top_states(lm, requests):
    return hidden_at_subject(lm, LAYERS[-1], requests)  # (n, d_model): what the edited layers pass on


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # Gemma 3: a post-MLP norm after the edited output
def test_preservation_rows_keep_other_subjects_and_the_edit_still_moves(family):
    pseudo = preservation_requests(REQUESTS[:2], load_subject_pool(), 8, seed=0)
    changes, own_changes, outputs = {}, {}, {}
    for count in (0, 8):
        editor = _editor(preserve_count=count, preserve_weight=4.0, lm=make_lm(family))
        lm = editor.lm
        before_other, before_own = _top_states(lm, pseudo), _top_states(lm, REQUESTS[:2])
        W0 = get_W(lm, LAYERS[0])
        record = editor.propose(REQUESTS[:2]).commit()
        changes[count] = float((_top_states(lm, pseudo) - before_other).norm())
        own_changes[count] = float((_top_states(lm, REQUESTS[:2]) - before_own).norm())
        if count:
            Kp = record.tensors["layers.1.Kp"] / 2.0  # stored scaled by √w
            assert Kp.shape == (lm.d_k, 16) and record.tensors["layers.1.Vp"].shape == (16, lm.d_model)
            assert record.tensors["layers.1.K"].shape == (lm.d_k, 2)  # the edits' own columns as before
            assert editor.n_edits_ == 2
        outputs[count] = (W0, get_W(lm, LAYERS[0]))
    # ||Δ(K_pᵀW)|| at the first layer (same keys in both runs: read before any write, same model)
    delta = {c: float((Kp.T @ (W1 - W0)).norm()) for c, (W0, W1) in outputs.items()}
    # bounds with a margin over what w = 4 gives on these random tiny models (real models: issue 29)
    assert delta[8] < 0.6 * delta[0], delta
    assert changes[8] < 0.65 * changes[0], changes  # and after the edited layers, where it counts
    assert own_changes[8] > 0.5 * own_changes[0], own_changes  # the edit still takes


def test_a_larger_weight_keeps_them_closer():
    Kp, delta = None, {}
    for w in (0.1, 100.0):
        editor = _editor(preserve_count=4, preserve_weight=w)
        W0 = get_W(editor.lm, LAYERS[0])
        record = editor.propose(REQUESTS[:1]).commit()
        raw = record.tensors["layers.1.Kp"] / w ** 0.5  # stored scaled by √w
        Kp = raw if Kp is None else Kp
        assert torch.allclose(raw, Kp, atol=1e-5)  # the same subjects and keys whatever the weight
        delta[w] = float((Kp.T @ (get_W(editor.lm, LAYERS[0]) - W0)).norm())
    assert delta[100.0] < 0.5 * delta[0.1], delta


@pytest.mark.parametrize("method", ["memit", "memit-seq", "alphaedit", "rlsedit-official"])
def test_other_column_solvers_take_the_rows(method):
    editor = _editor(method, preserve_count=3, v_num_grad_steps=2)
    W0 = get_W(editor.lm, LAYERS[0])
    record = editor.propose(REQUESTS[:2]).commit()
    assert record.tensors["layers.1.Kp"].shape[1] == 6
    replay = _editor(method, preserve_count=3)
    replay.apply_record(record)  # the stored columns give the same solve
    for l in LAYERS:
        assert torch.allclose(get_W(replay.lm, l), get_W(editor.lm, l), atol=1e-6)
    assert method == "alphaedit" or not torch.equal(get_W(editor.lm, LAYERS[0]), W0)


@pytest.mark.parametrize("positions", [0, 6])
def test_undoing_every_edit_removes_its_preservation_rows_too(positions):
    # the stream without one edit: tests/unit/test_editors.py::test_rlsedit_undo_equals_the_stream_without_that_edit
    editor = _editor(preserve_count=3, preserve_positions=positions, state_dtype="float64")
    for batch in (REQUESTS[:2], REQUESTS[2:]):
        editor.partial_fit(batch)
    for edit_id in "bac":
        editor.undo(edit_id)
    assert editor.n_edits_ == 0 and not editor.live_
    for l in LAYERS:  # had the rows stayed, W would keep their pull away from W_0
        assert float((editor.states_[l].W_ - editor.W0[l].double()).norm() / editor.W0[l].norm()) < 1e-9


def test_rows_at_every_position_keep_the_whole_prompts_and_the_edit_still_moves():
    from rlsedit.locate.keys import PromptKeys

    pseudo = preservation_requests(REQUESTS[:2], load_subject_pool(), 4, seed=0)
    width = 12
    moved, own = {}, {}
    for positions in (0, width):
        editor = _editor(preserve_count=4, preserve_positions=positions)
        lm = editor.lm
        everywhere = PromptKeys(lm, LAYERS[0], LAYERS[0], pseudo, width).keys(LAYERS[0])  # before the edit
        before_own = _top_states(lm, REQUESTS[:2])
        W0 = get_W(lm, LAYERS[0])
        record = editor.propose(REQUESTS[:2]).commit()
        if positions:
            Kp = record.tensors["layers.1.Kp"]  # w = 1: stored as read
            assert Kp.shape == (lm.d_k, 2 * 4 * width)  # request-major: 4 prompts × 12 positions each
            torch.testing.assert_close(Kp, everywhere, rtol=0, atol=1e-5)
        moved[positions] = float((everywhere.T @ (get_W(lm, LAYERS[0]) - W0)).norm())
        own[positions] = float((_top_states(lm, REQUESTS[:2]) - before_own).norm())
    # the subject-only rows keep one of a prompt's positions; these keep them all (margin over tiny models)
    assert moved[width] < 0.6 * moved[0], moved
    assert own[width] > 0.5 * own[0], own  # the edit still takes


# ---- the session: journal, replay and undo -------------------------------------------------------

def test_a_session_replays_and_undoes_the_same_weights(tmp_path):
    from rlsedit.session.session import Runtime, Session
    from tiny_models import SENTENCES, bpe_tokenizer, save, tiny_model

    tokenizer = bpe_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), seed=0, n_layers=4, max_positions=128, head_std=0.5,
                       tie_word_embeddings=False, initializer_range=0.1)
    spec = str(save(tmp_path / "model", model, tokenizer))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 20))
    runtime = Runtime(corpus=str(corpus), cache_dir=str(tmp_path / "cache"))
    config = RLSEditConfig(**{**FAST, "mom2_n_samples": 500, "v_num_grad_steps": 3}, preserve_count=3,
                           state_dtype="float64")
    state = tmp_path / "state"
    with Session.create(state, model=spec, config=config, runtime=runtime) as session:
        W_before = {l: get_W(session.lm, l) for l in LAYERS}
        session.edit(REQUESTS, batch_size=2)
        edited = session.status()
        assert edited["edits_applied"] == 3 and edited["batches"] == 2
        session.close(snapshot=False)  # journal only: opening replays it
    reopened = Session.open(state, runtime=runtime)
    assert reopened.status()["weights_sha256"] == edited["weights_sha256"]
    assert reopened.editor.config.preserve_count == 3
    reopened.undo("b")
    undone = reopened.status()
    assert undone["edits_applied"] == 2 and undone["weights_sha256"] != edited["weights_sha256"]
    reopened.close(snapshot=False)
    again = Session.open(state, runtime=runtime)
    assert again.status()["weights_sha256"] == undone["weights_sha256"]
    again.undo("a")
    again.undo("c")
    for l in LAYERS:  # all undone: the unedited weights, to float32 rounding of the float64 state
        assert float((get_W(again.lm, l) - W_before[l]).norm() / W_before[l].norm()) < 1e-6
    again.close()
