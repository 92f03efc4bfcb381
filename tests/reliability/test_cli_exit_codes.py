"""The command's contract for scripts: one exit code per kind of failure (rlsedit.errors),
``--json`` output that parses on every subcommand, and ``--skip-bad`` that skips what it
cannot read as well as what it cannot apply."""

from __future__ import annotations

import json
import shutil

import pytest
from session_tiny import build_world, cli, edit_records, state_files, tiny_runtime, write_jsonl

from rlsedit.session.session import Session


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("codes") / "world")


@pytest.fixture(scope="module")
def state(world, tmp_path_factory):
    state = tmp_path_factory.mktemp("codes-state") / "state"
    edits = write_jsonl(tmp_path_factory.mktemp("codes-edits") / "e.jsonl", edit_records(3))
    code, _, err = cli(world.edit_args(state, edits, batch_size=3))
    assert code == 0, err
    return state


def _code(args) -> tuple[int, str]:
    code, _, err = cli(args)
    return code, err


def test_each_kind_of_failure_has_its_exit_code(world, state, tmp_path):
    cache = ["--cache-dir", str(world.cache)]
    assert _code(["edit"])[0] == 2  # usage: argparse
    assert _code(["bench"])[0] == 2  # usage: no benchmark named
    code, err = _code(world.edit_args(state, tmp_path / "missing.jsonl"))
    assert code == 3 and "does not exist" in err  # invalid input
    code, err = _code(world.edit_args(state, write_jsonl(tmp_path / "e.jsonl", edit_records(1, start=9)),
                                      "--method", "memit"))
    assert code == 6 and "method" in err  # made with another method
    before = state_files(state)
    code, err = _code(world.edit_args(state, write_jsonl(tmp_path / "r.jsonl", edit_records(1, start=9)),
                                      "--target-rows", "0"))
    assert code == 3 and "target_rows" in err and state_files(state) == before  # refused before anything ran
    code, err = _code(["status", "--state", str(tmp_path), *cache])
    assert code == 10 and "not a state directory" in err
    writer = Session.open(state, runtime=tiny_runtime(world))
    try:
        code, err = _code(["undo", "--state", str(state), "--edit", "e0", *cache])
        assert code == 4 and "locked by" in err
    finally:
        writer.close()
    damaged = tmp_path / "damaged"
    shutil.copytree(state, damaged)
    snapshot = next(damaged.glob("snapshot-*.safetensors"))
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    code, err = _code(["status", "--state", str(damaged), *cache])
    assert code == 5 and "checksum" in err


def test_skip_bad_skips_unreadable_records_and_fails_when_nothing_was_applied(world, tmp_path):
    good = edit_records(2, start=20)
    records = [good[0], {"id": "empty-target", "prompt": "{} plays", "subject": "Toko", "target_new": ""},
               good[1], {"id": "no-subject", "prompt": "{} speaks", "target_new": "French"}]
    lines = [json.dumps(r) for r in records] + ["{not json"]
    edits = tmp_path / "mixed.jsonl"
    edits.write_text("\n".join(lines) + "\n")
    state = tmp_path / "state"
    code, out, err = cli(world.edit_args(state, edits, "--skip-bad", "--json"))
    assert code == 0, err
    report = json.loads(out)
    assert report["applied"] == 2
    reasons = {item["id"]: item["error"] for item in report["skipped"]}
    assert set(reasons) == {"empty-target", "no-subject", "4"}, reasons
    assert "target_new" in reasons["empty-target"] and "invalid JSON" in reasons["4"]
    # a file where nothing can be applied: every record skipped is a failure, and changes nothing
    before = state_files(state)
    bad_only = tmp_path / "bad.jsonl"
    bad_only.write_text(json.dumps(records[1]) + "\n" + json.dumps(records[3]) + "\n")
    code, out, err = cli(world.edit_args(state, bad_only, "--skip-bad"))
    assert code == 3 and "every edit was skipped" in err
    assert state_files(state) == before


def test_json_parses_on_every_subcommand(world, state, tmp_path):
    cache = ["--cache-dir", str(world.cache)]
    runs = {
        "status": ["status", "--state", str(state), "--json", *cache],
        "ask": ["ask", "--state", str(state), "--json", "--max-new-tokens", "2", *cache, "Paris is"],
        "export": ["export", "--state", str(state), "--out", str(tmp_path / "delta"), "--delta-only", "--json",
                   *cache],
        "stats": ["stats", "--model", str(world.model), "--corpus", str(world.corpus), "--layers", "1",
                  "--max-tokens", "200", "--json", *cache],
        "bench solver": ["bench", "solver", "--dk", "32", "--dv", "8", "--u", "1", "--history", "4",
                         "--repeats", "1", "--json"],
    }
    for name, args in runs.items():
        code, out, err = cli(args)
        assert code == 0, (name, err)
        assert isinstance(json.loads(out), dict), name
    edits = write_jsonl(tmp_path / "one.jsonl", edit_records(1, start=40))
    state2 = tmp_path / "state2"
    code, out, err = cli(world.edit_args(state2, edits, "--json"))
    assert code == 0 and json.loads(out)["applied"] == 1, err
    code, out, err = cli(["undo", "--state", str(state2), "--edit", "e40", "--json", *cache])
    assert code == 0, err
    assert json.loads(out) == {"undone": "e40", "edits_total": 0}
