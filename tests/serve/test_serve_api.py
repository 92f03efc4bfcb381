"""The server through the official ``openai`` client and raw HTTP, on a tiny random model:
queries (greedy = ``rlsedit ask``), chat, streaming, auth scopes, bad input, edits and undo."""

from __future__ import annotations

import concurrent.futures
import shutil

import pytest

from serve_tiny import (EDIT_TOKEN, QUERY_TOKEN, ask_greedy, build_served_world, client, http, make_served_state,
                        one_thread, openai, server_thread, write_tokens)

__all__ = ["one_thread"]

PROMPTS = ["Paris 0 is located in", "The mother tongue of Madrid 1 is", "Toko Yasuda plays the"]
NEW_EDIT = {"id": "n1", "prompt": "{} plays the", "subject": "Rome 9", "target_new": "piano"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    world = build_served_world(root)
    make_served_state(world, root / "state", n_edits=2)
    return world


@pytest.fixture(scope="module")
def expected(world):
    """``rlsedit ask``'s greedy completions on the state, before any server touched it."""
    return {p: ask_greedy(world, world.root / "state", p, 8) for p in PROMPTS}


@pytest.fixture(scope="module")
def server(world, expected):
    state = world.root / "served"
    shutil.copytree(world.root / "state", state)
    # a small body limit: the refused body still fits in the socket buffers (no broken pipe)
    with server_thread(world, state, tokens=write_tokens(world.root / "tokens.json"),
                       max_body_bytes=16_384) as (base, service):
        yield base, service


def _reader(server):
    return client(server[0], QUERY_TOKEN)


def _version(server) -> int:
    return http("GET", server[0].replace("/v1", "") + "/health")[1]["weight_version"]


def test_greedy_completion_equals_ask(server, expected):
    c = _reader(server)
    for prompt in PROMPTS:
        r = c.completions.create(model=server[1].model_id, prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == expected[prompt]
        assert r.system_fingerprint == f"wv{_version(server)}"
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
    many = c.completions.create(model=server[1].model_id, prompt=PROMPTS, max_tokens=8, temperature=0, n=2)
    assert [ch.text for ch in many.choices] == [expected[p] for p in PROMPTS for _ in range(2)]


def test_models_lists_the_served_model(server):
    assert [m.id for m in _reader(server).models.list().data] == [server[1].model_id]


def test_chat_uses_the_template(server):
    service = server[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Where is Paris 0?"}]
    text = service.live.lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("assistant:")
    c = _reader(server)
    chat = c.chat.completions.create(model=service.model_id, messages=messages, max_tokens=6, temperature=0)
    plain = c.completions.create(model=service.model_id, prompt=text, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"


def test_streaming_gives_the_same_text(server, expected):
    c, model, prompt = _reader(server), server[1].model_id, PROMPTS[0]
    chunks = list(c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected[prompt]
    assert chunks[-1].choices[0].finish_reason is not None
    assert {ch.system_fingerprint for ch in chunks} == {f"wv{_version(server)}"}
    messages = [{"role": "user", "content": "hello"}]
    whole = c.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    parts = list(c.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_and_seeded_sampling(server, expected):
    c, model, prompt = _reader(server), server[1].model_id, PROMPTS[0]
    full = expected[prompt]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip()
    cut = c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=[stop], stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == full[:full.find(stop)]
    a, b, other = (c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.9,
                                        seed=s).choices[0].text for s in (7, 7, 8))
    assert a == b
    texts = {c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.5, seed=s).choices[0].text
             for s in range(4)}
    assert len(texts) > 1  # sampling does sample


def test_auth_scopes(server):
    base, model = server[0], server[1].model_id
    with pytest.raises(openai.AuthenticationError) as info:
        client(base, "wrong-token-0123456789abcdef").completions.create(model=model, prompt="a", max_tokens=1)
    assert info.value.status_code == 401 and "invalid bearer token" in str(info.value)
    status, body = http("POST", base + "/completions", {"model": model, "prompt": "a"})
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, body = http("POST", base + "/edits", NEW_EDIT | {"id": "denied"}, token=QUERY_TOKEN)
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert http("GET", base + "/edits/denied", token=QUERY_TOKEN)[0] == 404  # nothing applied
    assert http("DELETE", base + "/edits/e0", token=QUERY_TOKEN)[0] == 403
    # the edit scope implies the query scope; /health needs no token
    assert client(base, EDIT_TOKEN).completions.create(model=model, prompt="a", max_tokens=1, temperature=0).choices
    assert http("GET", base.replace("/v1", "") + "/health")[0] == 200


BAD_QUERIES = [  # (body changes, status, param or code named)
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"max_tokens": 10_000}, 400, "max_tokens_too_large"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"prompt": 12}, 400, "prompt"),
    ({"prompt": "Paris " * 200}, 400, "context_length_exceeded"),
    ({"model": "gpt-9"}, 404, "model_not_found"),
    ({"n": 1000}, 400, "n"),
    ({"logprobs": 3}, 400, "not supported"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


@pytest.mark.parametrize("change,status,named", BAD_QUERIES)
def test_bad_queries_are_refused_and_the_server_keeps_serving(server, expected, change, status, named):
    base, model = server[0], server[1].model_id
    got, body = http("POST", base + "/completions", {"model": model, "prompt": "a", "max_tokens": 2} | change,
                     token=QUERY_TOKEN)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert named in " ".join(str(v) for v in body["error"].values())
    r = _reader(server).completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == expected[PROMPTS[0]]


def test_bad_bodies_and_bad_edits_change_nothing(server):
    base, model = server[0], server[1].model_id
    before = http("GET", base + "/state", token=QUERY_TOKEN)[1]
    cases = [
        ("POST", "/completions", "{not json", 400, "invalid_json"),
        ("POST", "/completions", "x" * (server[1].config.max_body_bytes + 1), 413, "request_too_large"),
        ("POST", "/edits", "{not json", 400, "invalid_json"),
        ("POST", "/edits", {"prompt": "{} plays the", "subject": "Nobody", "target_new": "x"} | {"prompt": "no slot"},
         400, "subject"),
        ("POST", "/edits", [NEW_EDIT | {"id": "ok1"}, {"id": "bad", "prompt": "{} is", "subject": "A"}], 400,
         "target_new"),
        ("POST", "/edits", NEW_EDIT | {"id": "e0"}, 409, "edit_id_exists"),
        ("POST", "/edits", [], 400, "no edit records"),
        ("DELETE", "/edits/no-such-edit", None, 404, "edit_not_found"),
        ("GET", "/edits?status=maybe", None, 400, "status"),
        ("GET", "/nowhere", None, 404, "not_found_error"),
    ]
    for method, path, body, status, named in cases:
        got, answer = http(method, base + path, body, token=EDIT_TOKEN)
        assert got == status, (path, answer)
        assert named in " ".join(str(v) for v in answer["error"].values()), answer
    after = http("GET", base + "/state", token=QUERY_TOKEN)[1]
    for key in ("weight_version", "weights_sha256", "edits_applied", "journal_entries"):
        assert after[key] == before[key], key
    assert http("GET", base + "/edits/ok1", token=QUERY_TOKEN)[0] == 404  # its batch was refused whole
    assert _reader(server).completions.create(model=model, prompt="a", max_tokens=1, temperature=0).choices


def test_edit_list_and_undo_over_http(server, expected):
    base, model = server[0], server[1].model_id
    prompt = "Rome 9 plays the"
    c = _reader(server)
    before = c.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    lines = "\n".join(__import__("json").dumps(NEW_EDIT | {"id": f"u{i}", "subject": f"Rome {9 + i}"})
                      for i in range(2))
    status, done = http("POST", base + "/edits", lines, token=EDIT_TOKEN, content_type="application/jsonl")
    assert status == 200 and done["ids"] == ["u0", "u1"], done
    assert done["weight_version"] > int(before.system_fingerprint[2:])
    edited = c.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    assert edited.system_fingerprint == done["system_fingerprint"]
    assert edited.choices[0].text != before.choices[0].text  # the edit changed the answer
    page = http("GET", base + "/edits?limit=1&offset=1&q=rome", token=QUERY_TOKEN)[1]
    assert page["total"] == 2 and [e["id"] for e in page["data"]] == ["u1"] and not page["has_more"]
    for edit_id in ("u0", "u1"):
        status, undone = http("DELETE", base + f"/edits/{edit_id}", token=EDIT_TOKEN)
        assert status == 200 and undone["deleted"], undone
    assert http("GET", base + "/edits/u0", token=QUERY_TOKEN)[1]["status"] == "undone"
    assert http("DELETE", base + "/edits/u0", token=EDIT_TOKEN)[0] == 409
    after = c.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    assert after.choices[0].text == before.choices[0].text  # exact undo
    assert after.system_fingerprint == undone["system_fingerprint"]
    state = http("GET", base + "/state", token=QUERY_TOKEN)[1]
    assert state["weight_version"] == state["journal_entries"] == undone["weight_version"]
    assert server[1].live.weights_equal(server[1].session.lm, server[1].session.editor.layers)


def test_an_edit_posted_while_eight_clients_query(world, tmp_path):
    """No response mixes two weight versions: each equals ``ask`` on the state of its version."""
    state = tmp_path / "state"
    shutil.copytree(world.root / "state", state)
    prompt = "Rome 9 plays the"
    old = ask_greedy(world, state, prompt, 6)
    with server_thread(world, state) as (base, service):
        v0 = service.live.version
        c = client(base)

        def query(_):
            out = []
            for _ in range(6):
                r = c.completions.create(model=service.model_id, prompt=prompt, max_tokens=6, temperature=0)
                out.append((r.system_fingerprint, r.choices[0].text))
            return out

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            running = [pool.submit(query, i) for i in range(8)]
            status, done = http("POST", base + "/edits", NEW_EDIT)
            answers = [a for f in running for a in f.result(timeout=300)]
        assert status == 200, done
        late = c.completions.create(model=service.model_id, prompt=prompt, max_tokens=6, temperature=0)
        assert late.system_fingerprint == done["system_fingerprint"] == f"wv{v0 + 1}"
        assert service.scheduler.waves < service.scheduler.rows_decoded  # queries shared forward passes
    new = ask_greedy(world, state, prompt, 6)  # `rlsedit ask` on the edited state
    assert new != old and late.choices[0].text == new
    by_version = {f"wv{v0}": old, f"wv{v0 + 1}": new}
    assert len(answers) == 48 and {fp for fp, _ in answers} <= set(by_version)
    for fp, text in answers:
        assert text == by_version[fp], (fp, text)


def test_queries_are_answered_while_an_edit_is_computed(world, tmp_path):
    """Hold an edit inside ``propose`` (its weights are written into the editor's model, not
    yet journaled): queries are answered meanwhile, from the old weights, at the old version."""
    import threading

    state = tmp_path / "state"
    shutil.copytree(world.root / "state", state)
    prompt = "Rome 9 plays the"
    old = ask_greedy(world, state, prompt, 6)
    with server_thread(world, state) as (base, service):
        editor = service.session.editor
        real_propose, inside, release = editor.propose, threading.Event(), threading.Event()

        def held_propose(requests):
            proposal = real_propose(requests)
            inside.set()
            assert release.wait(timeout=120)
            return proposal

        editor.propose = held_propose
        v0 = service.live.version
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            posted = pool.submit(http, "POST", base + "/edits", NEW_EDIT)
            assert inside.wait(timeout=120)
            c = client(base)
            during = [c.completions.create(model=service.model_id, prompt=prompt, max_tokens=6, temperature=0)
                      for _ in range(3)]
            release.set()
            status, done = posted.result(timeout=120)
        assert status == 200 and done["weight_version"] == v0 + 1
        assert all((r.system_fingerprint, r.choices[0].text) == (f"wv{v0}", old) for r in during)
        after = c.completions.create(model=service.model_id, prompt=prompt, max_tokens=6, temperature=0)
        assert after.system_fingerprint == f"wv{v0 + 1}" and after.choices[0].text != old


def test_edits_arriving_together_are_one_batch(world, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(world.root / "state", state)
    # the wave closes when the four posts (four requests) are in, or after 10 s
    with server_thread(world, state, edit_wait_s=10.0, edit_batch_size=4) as (base, service):
        v0 = service.live.version
        bodies = [NEW_EDIT | {"id": f"t{i}", "subject": f"Rome {20 + i}"} for i in range(3)] + [NEW_EDIT | {"id": "e0"}]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: http("POST", base + "/edits", b), bodies))
        ok = [a for status, a in answers if status == 200]
        assert sorted(a["ids"][0] for a in ok) == ["t0", "t1", "t2"]
        assert {a["weight_version"] for a in ok} == {v0 + 1}  # one journal entry for the three
        assert [status for status, _ in answers].count(409) == 1  # the reused id, refused alone
        batches = {http("GET", base + f"/edits/t{i}")[1]["batch"] for i in range(3)}
        assert batches == {v0}
