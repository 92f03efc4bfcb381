"""``rlsedit serve`` as a process: an acknowledged edit survives ``kill -9``, a restart serves
the same weight version and answers; binding a non-loopback address needs a tokens file."""

from __future__ import annotations

import signal

from serve_tiny import (build_served_world, client, http, make_served_state, one_thread, start_server_process)

from session_tiny import assert_one_line_error, cli

__all__ = ["one_thread"]


def test_acknowledged_edit_survives_kill_9_and_restart(tmp_path):
    world = build_served_world(tmp_path / "world")
    state = tmp_path / "state"
    make_served_state(world, state, n_edits=1)
    prompt = "Rome 9 plays the"
    process, base = start_server_process(world, state)
    try:
        status, done = http("POST", base + "/edits", {"id": "k1", "prompt": "{} plays the", "subject": "Rome 9",
                                                      "target_new": "piano"})
        assert status == 200, done
        model = client(base).models.list().data[0].id
        answer = client(base).completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        assert answer.system_fingerprint == done["system_fingerprint"]
        sha = http("GET", base + "/state")[1]["weights_sha256"]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    process, base = start_server_process(world, state)
    try:
        state_now = http("GET", base + "/state")[1]
        assert state_now["weight_version"] == done["weight_version"]
        assert state_now["weights_sha256"] == sha
        assert http("GET", base + "/edits/k1")[1]["status"] == "live"
        again = client(base).completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        assert (again.system_fingerprint, again.choices[0].text) == (answer.system_fingerprint, answer.choices[0].text)
    finally:
        process.send_signal(signal.SIGTERM)  # graceful: the lifespan's shutdown snapshots and releases the state
        # uvicorn re-raises the signal it caught once it has shut down
        assert process.wait(timeout=120) in (0, -signal.SIGTERM)
        process.stdout.close()
        process.stderr.close()
    from rlsedit.session.store import StateStore

    with StateStore.open(state) as store:  # the lock is free, and the snapshot covers the whole journal
        assert store.snapshot_covers_seq == store.journal_count == done["weight_version"]


def test_non_loopback_address_needs_tokens(tmp_path):
    code, _, err = cli(["serve", "--state", str(tmp_path / "nowhere"), "--host", "0.0.0.0", "--port", "0"])
    assert_one_line_error(code, err, "without --tokens", "--insecure-no-auth")
