"""The console's routes over HTTP on a tiny random model: the pages are served without a token
and load nothing from elsewhere; the unedited answer is the unedited model's; checks, the
forgetting curve and the drift history agree with what they summarise."""

from __future__ import annotations

import re
import shutil
import urllib.request

import pytest

from serve_tiny import (EDIT_TOKEN, QUERY_TOKEN, ask_greedy, build_served_world, http, make_served_state,
                        one_thread, server_thread, write_tokens)

__all__ = ["one_thread"]

PROMPT = "Rome 9 plays the"
NEW_EDIT = {"id": "c1", "prompt": "{} plays the", "subject": "Rome 9", "target_new": "piano"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    world = build_served_world(root)
    make_served_state(world, root / "state", n_edits=3)
    make_served_state(world, root / "unedited", n_edits=0)
    return world


@pytest.fixture(scope="module")
def server(world):
    state = world.root / "served"
    shutil.copytree(world.root / "state", state)
    with server_thread(world, state, tokens=write_tokens(world.root / "tokens.json")) as (base, service):
        yield base.replace("/v1", ""), service


def _get_raw(url: str) -> tuple[int, object, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.headers, response.read()  # names case-insensitive


def test_pages_need_no_token_and_load_nothing_from_elsewhere(server):
    root = server[0]
    status, headers, body = _get_raw(root + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    html = body.decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("/console/") for r in refs), refs
    for ref in refs:
        status, headers, asset = _get_raw(root + ref)
        assert status == 200 and asset and "http" not in re.sub(r"http://www\.w3\.org/2000/svg", "", asset.decode())
    assert http("GET", root + "/console/..%2Fapp.py")[0] == 404
    assert http("GET", root + "/console/routes.py")[0] == 404


def test_data_routes_need_a_token(server):
    root = server[0]
    assert http("GET", root + "/v1/console/whoami")[0] == 401
    assert http("POST", root + "/v1/console/ask", {"prompt": PROMPT})[0] == 401
    status, me = http("GET", root + "/v1/console/whoami", token=QUERY_TOKEN)
    assert status == 200 and me["scopes"] == ["query"] and me["name"] == "reader"
    assert http("GET", root + "/v1/console/whoami", token=EDIT_TOKEN)[1]["scopes"] == ["edit", "query"]


def test_ask_gives_the_edited_and_the_unedited_answer(server, world):
    root, service = server
    status, answer = http("POST", root + "/v1/console/ask", {"prompt": "Paris 0 is located in", "max_tokens": 6},
                          token=QUERY_TOKEN)
    assert status == 200, answer
    direct = http("POST", root + "/v1/completions", {"prompt": "Paris 0 is located in", "max_tokens": 6,
                                                     "temperature": 0}, token=QUERY_TOKEN)[1]
    assert answer["edited"]["text"] == direct["choices"][0]["text"]
    assert answer["system_fingerprint"] == direct["system_fingerprint"]
    # the unedited answer is `rlsedit ask` on a state that never had an edit
    assert answer["unedited"]["text"] == ask_greedy(world, world.root / "unedited", "Paris 0 is located in", 6)
    assert answer["edited"]["text"] != answer["unedited"]["text"]  # e0 edited this fact
    chat = http("POST", root + "/v1/console/ask", {"prompt": "Where is Paris 0?", "mode": "chat", "max_tokens": 4},
                token=QUERY_TOKEN)[1]
    via_chat = http("POST", root + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Where is Paris 0?"}],
                                                            "max_tokens": 4, "temperature": 0}, token=QUERY_TOKEN)[1]
    assert chat["edited"]["text"] == via_chat["choices"][0]["message"]["content"]
    for bad, named in [({"prompt": ""}, "prompt"), ({"prompt": "a", "max_tokens": 10_000}, "max_tokens"),
                       ({"prompt": "a", "mode": "poem"}, "mode"), ({"prompt": "a", "extra": 1}, "extra")]:
        status, body = http("POST", root + "/v1/console/ask", bad, token=QUERY_TOKEN)
        assert status == 400 and named in body["error"]["message"] + str(body["error"]["param"]), body


def test_edit_then_undo_moves_checks_curve_and_drift(server):
    root, service = server
    v0 = service.live.version
    drift0 = http("GET", root + "/v1/console/drift", token=QUERY_TOKEN)[1]
    assert drift0["points"][-1]["weight_version"] == v0 and drift0["points"][-1]["live_edits"] == 3
    checks0 = http("POST", root + "/v1/console/check", {"ids": ["e0", "e1", "e2"]}, token=QUERY_TOKEN)[1]
    assert checks0["weight_version"] == v0
    for c in checks0["data"]:  # the check is the greedy continuation, cut at "." / newline, scored begins-with
        item = http("GET", root + f"/v1/edits/{c['id']}", token=QUERY_TOKEN)[1]
        text = item["prompt"].replace("{}", item["subject"])
        direct = http("POST", root + "/v1/completions", {"prompt": text, "max_tokens": 12, "temperature": 0,
                                                         "stop": [".", "\n"]}, token=QUERY_TOKEN)[1]
        assert c["generation"] == direct["choices"][0]["text"]
        words = c["generation"].lower().split()
        assert c["says"] == (words[:len(item["target_new"].split())] == item["target_new"].lower().split())
    page = http("GET", root + "/v1/console/edits?status=live", token=QUERY_TOKEN)[1]
    assert [e["check"]["says"] for e in page["data"]] == [c["says"] for c in checks0["data"]]  # cached
    assert all(isinstance(e["accepted_at"], float) for e in page["data"])

    curve = http("GET", root + "/v1/console/forgetting?n=2&seed=3", token=QUERY_TOKEN)[1]
    assert curve["live_edits"] == 3 and len(curve["points"]) == 2 and not curve["cached"]
    by_id = {c["id"]: c["says"] for c in checks0["data"]}
    assert all(by_id[p["id"]] == p["says"] for p in curve["points"])
    assert [p["position"] for p in curve["points"]] == sorted(p["position"] for p in curve["points"])
    assert http("GET", root + "/v1/console/forgetting?n=2&seed=3", token=QUERY_TOKEN)[1]["cached"]

    assert http("POST", root + "/v1/edits", NEW_EDIT, token=QUERY_TOKEN)[0] == 403
    status, done = http("POST", root + "/v1/edits", NEW_EDIT, token=EDIT_TOKEN)
    assert status == 200, done
    v1 = done["weight_version"]
    state = http("GET", root + "/v1/state", token=QUERY_TOKEN)[1]
    point = http("GET", root + "/v1/console/drift", token=QUERY_TOKEN)[1]["points"][-1]
    assert point["weight_version"] == v1 and point["live_edits"] == 4
    for layer, d in state["layer_diagnostics"].items():
        assert point["drift"][layer] == pytest.approx(d["drift_fro"], rel=1e-5)
    page = http("GET", root + "/v1/console/edits?q=c1", token=QUERY_TOKEN)[1]
    assert page["total"] == 1 and page["data"][0]["check"] is None  # the cache is per weight version
    curve = http("GET", root + "/v1/console/forgetting?n=2&seed=3", token=QUERY_TOKEN)[1]
    assert curve["weight_version"] == v1 and not curve["cached"] and curve["live_edits"] == 4

    assert http("DELETE", root + "/v1/edits/c1", token=EDIT_TOKEN)[0] == 200
    points = http("GET", root + "/v1/console/drift", token=QUERY_TOKEN)[1]["points"]
    assert [p["live_edits"] for p in points[-2:]] == [4, 3]
    assert points[-1]["drift"] == pytest.approx(drift0["points"][-1]["drift"], rel=1e-4, abs=1e-6)  # exact undo
    status, body = http("POST", root + "/v1/console/check", {"ids": ["nope"]}, token=QUERY_TOKEN)
    assert status == 404 and body["error"]["param"] == "ids[0]"


def test_unedited_model_shares_every_tensor_but_the_edited_weights(server):
    import torch

    from rlsedit.model.weights import down_proj, get_W
    from rlsedit.serve.console.unedited import UneditedModel

    live, editor = server[1].live, server[1].session.editor
    unedited = UneditedModel(live, {l: editor.W0[l] for l in editor.layers}).model()
    edited = {id(down_proj(live.lm, l).weight) for l in editor.layers}
    theirs = dict(unedited.model.named_parameters())
    assert theirs.keys() == dict(live.lm.model.named_parameters()).keys()
    for name, mine in live.lm.model.named_parameters():
        assert (theirs[name] is mine) == (id(mine) not in edited), name
    for l in editor.layers:
        assert torch.equal(get_W(unedited, l), editor.W0[l].float()) and not torch.equal(get_W(live.lm, l), editor.W0[l])


def test_progress_shows_the_batch_being_computed(server):
    import concurrent.futures

    from test_console_browser import edit_held_in_propose

    root, service = server
    idle = http("GET", root + "/v1/console/progress", token=QUERY_TOKEN)[1]
    assert idle["running"] is None and idle["queued_edits"] == 0
    v0 = service.live.version
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with edit_held_in_propose(service) as inside:
            posted = pool.submit(http, "POST", root + "/v1/edits", NEW_EDIT | {"id": "p1"}, token=EDIT_TOKEN)
            assert inside.wait(timeout=120)
            during = http("GET", root + "/v1/console/progress", token=QUERY_TOKEN)[1]
            answer = http("POST", root + "/v1/console/ask", {"prompt": PROMPT, "max_tokens": 4}, token=QUERY_TOKEN)[1]
        status, done = posted.result(timeout=120)
    assert during["running"]["ids"] == ["p1"] and during["weight_version"] == v0
    assert answer["weight_version"] == v0  # answered while the edit was held, from the old weights
    assert status == 200 and done["weight_version"] == v0 + 1
    assert http("GET", root + "/v1/console/progress", token=QUERY_TOKEN)[1]["running"] is None
    assert http("DELETE", root + "/v1/edits/p1", token=EDIT_TOKEN)[0] == 200
