"""Fuzz the edit-file parser: random records and random bytes give edit requests that keep
their invariants, or InvalidRequestError — never another exception.

Found by this fuzzing and fixed: JSON ``\\ud800`` escapes decode to lone surrogates, which the
parser accepted and the tokenizer then crashed on (TypeError); deeply nested JSON raised
RecursionError out of ``read_requests``.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlsedit.errors import InvalidRequestError
from rlsedit.requests import EditRequest, parse_request, read_requests

SETTINGS = settings(max_examples=400, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

FIELDS = ["id", "case_id", "prompt", "subject", "target_new", "target_true", "ground_truth", "requested_rewrite",
          "src", "alt", "answers", "rephrase", "loc", "loc_ans", "paraphrases", "neighborhood",
          "neighborhood_answers", "generation_prompts", "paraphrase_prompts", "neighborhood_prompts",
          "rephrase_prompt", "locality_prompt", "locality_ground_truth", "str"]

# Text that often hits the parser's cases: slots, subjects inside prompts, blanks, surrogates.
pieces = st.sampled_from(["{}", "{", "}", " ", "", "Paris", "Rome", "is in", "\t", "\n", "é", "\ud800", "{}{}"])
texts = st.one_of(st.text(max_size=12), st.lists(pieces, max_size=5).map("".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20), st.floats(allow_nan=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=4)), inner, max_size=5),
), max_leaves=12)


GOOD_SUBJECTS = st.sampled_from(["Paris", "Danielle Darrieux", "é Ω 東京", "  padded  ", "a{b"])
GOOD_TARGETS = st.sampled_from(["Rome", " Swedish ", "x", "東京"])


def often(good, bad):
    """Mostly ``good``: each field of a record is damaged only now and then."""
    return st.sampled_from([True] * 5 + [False]).flatmap(lambda ok: good if ok else bad)


@st.composite
def records(draw):
    """Records in one of the four layouts (or anything JSON), mostly well-formed, with random
    damage: values of the wrong type, fields dropped or added, odd text."""
    layout = draw(st.sampled_from(["ours", "rome", "mend-cf", "zsre", "random"]))
    subject = draw(often(GOOD_SUBJECTS, texts))
    prompt = draw(often(st.sampled_from(["{} is in", f"{subject} is in", f"The home of {subject}, which"]), texts))
    target = draw(often(GOOD_TARGETS, st.one_of(texts, json_values)))
    record_id = draw(often(st.one_of(st.integers(0, 10**6), texts), json_values))
    if layout == "ours":
        record = {"id": record_id, "prompt": prompt, "subject": subject, "target_new": target,
                  "paraphrases": draw(often(st.lists(texts, max_size=2), json_values))}
    elif layout == "rome":
        rewrite = {"prompt": prompt, "subject": subject,
                   "target_new": draw(often(GOOD_TARGETS.map(lambda t: {"str": t}), json_values)),
                   "target_true": draw(often(GOOD_TARGETS.map(lambda t: {"str": t}), json_values))}
        record = {"case_id": record_id,
                  "requested_rewrite": draw(often(st.one_of(st.just(rewrite), st.just([rewrite])), json_values)),
                  "paraphrase_prompts": draw(often(st.lists(texts, max_size=2), json_values)),
                  "neighborhood_prompts": draw(often(st.lists(texts, max_size=2), json_values))}
    elif layout == "mend-cf":
        record = {"case_id": record_id, "prompt": prompt, "subject": subject, "target_new": target,
                  "ground_truth": draw(often(GOOD_TARGETS, json_values)),
                  "rephrase_prompt": draw(often(texts, json_values))}
    elif layout == "zsre":
        record = {"subject": subject, "src": prompt, "alt": target,
                  "answers": draw(often(st.lists(GOOD_TARGETS, min_size=1, max_size=2), json_values)),
                  "loc": draw(often(texts, json_values)), "loc_ans": draw(often(texts, json_values))}
    else:
        return draw(json_values)
    if draw(st.integers(0, 3)) == 0:  # damage
        extra = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2))
        drop = draw(st.lists(st.sampled_from(sorted(record)), max_size=2))
        record.update(extra)
        for key in drop:
            record.pop(key, None)
    return record


def check_request(request: EditRequest) -> None:
    """What every consumer of an EditRequest relies on."""
    assert isinstance(request.id, str)
    for text in (request.id, request.prompt, request.subject, request.target_new,
                 *request.paraphrases, *request.neighborhood, *request.neighborhood_answers):
        assert isinstance(text, str)
        text.encode("utf-8")  # journal and tokenizer need real Unicode text
    assert request.prompt.count("{}") == 1
    assert request.subject.strip() and request.target_new and request.target_new == request.target_new.strip()
    assert request.subject in request.text
    assert parse_request(request.to_record(), 0) == request  # the journal's layout reads back the same


@SETTINGS
@given(record=records(), index=st.integers(0, 10**6))
def test_parse_request_gives_a_sound_request_or_a_clear_error(record, index):
    try:
        request = parse_request(record, index)
    except InvalidRequestError as exc:
        assert f"edit #{index}" in str(exc)
        return
    check_request(request)


@SETTINGS
@given(data=st.one_of(
    st.binary(max_size=300),
    st.lists(records(), max_size=4).map(lambda rs: json.dumps(rs).encode()),
    st.lists(records(), max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()),
    st.lists(st.sampled_from(['{"', '[', ']', '{}', '"', '\n', '\\ud800', 'null', ',', ':', '\xff']), max_size=30)
      .map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
), suffix=st.sampled_from([".jsonl", ".json", ".txt"]), limit=st.one_of(st.none(), st.integers(0, 3)))
def test_read_requests_never_crashes_on_any_bytes(tmp_path, data, suffix, limit):
    path = tmp_path / f"edits{suffix}"
    path.write_bytes(data)
    try:
        requests = read_requests(path, limit=limit)
    except InvalidRequestError as exc:
        assert str(path) in str(exc) or "edit #" in str(exc) or "occurs twice" in str(exc)
        return
    assert limit is None or len(requests) <= limit
    assert len({r.id for r in requests}) == len(requests)
    for request in requests:
        check_request(request)


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    good = json.dumps({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"})
    for name, text in (("deep.json", "[" * 100_000), ("deep.jsonl", good + "\n" + "[" * 100_000 + "\n")):
        path = tmp_path / name
        path.write_text(text)
        try:
            read_requests(path)
        except InvalidRequestError as exc:
            assert "invalid JSON" in str(exc)
        else:
            raise AssertionError("nested JSON was accepted")


def test_lone_surrogates_are_refused_in_every_text_field():
    good = {"id": "a", "prompt": "{} is in", "subject": "Paris", "target_new": "Rome", "paraphrases": ["x"]}
    for key in ("id", "prompt", "subject", "target_new", "paraphrases"):
        record = dict(good)
        record[key] = ["bad \ud800"] if key == "paraphrases" else "{} bad \udfff" if key == "prompt" else "bad \ud800"
        try:
            parse_request(record, 3)
        except InvalidRequestError as exc:
            assert "not valid Unicode text" in str(exc) and key in str(exc)
            str(exc).encode("utf-8")  # the message itself can be printed
        else:
            raise AssertionError(f"a lone surrogate in {key!r} was accepted")


def test_the_four_layouts_parse():
    """The fuzzing above must not pass only because everything is refused."""
    ours = {"id": 7, "prompt": "{} is in", "subject": "Paris", "target_new": " Rome "}
    rome = {"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                                                "target_new": {"str": "Rome"}, "target_true": {"str": "France"}},
            "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n1", "n2"]}
    mend = {"case_id": 2, "prompt": "Paris is in", "subject": "Paris", "target_new": "Rome", "ground_truth": "France",
            "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "a"}
    zsre = {"subject": "Paris", "src": "Where is Paris?", "alt": "Rome", "answers": ["France"], "loc": "l",
            "loc_ans": "a"}
    parsed = [parse_request(r, i) for i, r in enumerate((ours, rome, mend, zsre))]
    for request in parsed:
        check_request(request)
    assert [r.id for r in parsed] == ["7", "1", "2", "3"]
    assert {r.target_new for r in parsed} == {"Rome"}
    assert parsed[1].neighborhood_answers == ("France", "France")
