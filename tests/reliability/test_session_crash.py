"""kill -9 a real ``rlsedit edit`` stream; rerunning the same command resumes to the same weights.

One edit file of 60 edits in batches of 2 (30 journal entries; a snapshot falls due after
25 batches of one run), on a tiny random Llama saved as a local model directory. The
reference is the same command run once without interruption. The interrupted state is
killed four times: once while ``create`` writes its first snapshot (a child that kills
itself there), then at three seeded random points of the stream; a fifth run finishes it.
Kills test crashes of the process (the page cache survives); see RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from session_tiny import (assert_one_line_error, build_world, child_env, cli, cli_status, edit_records,
                          journal_seqs, one_thread, rlsedit_command, run_rlsedit, state_files, write_jsonl)

from rlsedit.session.store import StateStore, is_state_dir

__all__ = ["one_thread"]  # autouse fixture, imported for its effect

N_EDITS = 60
BATCH = 2
SEED = 20260611

# A child that dies by SIGKILL inside the first snapshot write of Session.create: after the
# manifest exists, before any snapshot does.
KILL_IN_CREATE = """
import os, signal, sys
from rlsedit.cli import main
from rlsedit.session.store import StateStore

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

StateStore.write_snapshot = die
main(sys.argv[1:])
"""


def check_whole_batches(state, records) -> int:
    """Open (and so recover) the state; every acknowledged entry is one whole batch of the
    file, in file order. Returns the number of entries."""
    with StateStore.open(state) as store:
        for entry in store.entries():
            want = [r["id"] for r in records[entry.seq * BATCH:(entry.seq + 1) * BATCH]]
            assert entry.kind == "batch" and entry.meta["ids"] == want, (entry.seq, entry.meta["ids"])
            assert all(t.shape[-1 if name.endswith(".K") else 0] == BATCH for name, t in entry.tensors.items())
        return store.journal_count


def wait_for_entries(child: subprocess.Popen, state, target: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while journal_seqs(state) < target:
        assert child.poll() is None, f"the child ended before entry {target}: {child.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no entry {target} after {timeout} s"
        time.sleep(0.005)


def test_kill_9_anywhere_then_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    world = build_world(tmp_path / "world")
    records = edit_records(N_EDITS)
    edits = write_jsonl(tmp_path / "edits.jsonl", records)

    code, out, err = cli(world.edit_args(tmp_path / "reference", edits, "--json", batch_size=BATCH))
    assert code == 0, err
    assert json.loads(out)["applied"] == N_EDITS
    reference = cli_status(world, tmp_path / "reference")
    assert reference["journal_entries"] == N_EDITS // BATCH

    state = tmp_path / "state"
    command = world.edit_args(state, edits, "--json", batch_size=BATCH)

    # kill 1: inside create, between the manifest and the first snapshot
    died = subprocess.run([sys.executable, "-c", KILL_IN_CREATE, *command], capture_output=True, text=True,
                          env=child_env(threads=1), timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert is_state_dir(state) and not list(state.glob("snapshot-*"))

    # kills 2-4: at seeded random journal lengths, plus a random delay (some land inside the
    # next batch's computation or its journal write, some inside a snapshot)
    rng = random.Random(SEED)
    targets = [rng.randint(2, 9), rng.randint(11, 18), rng.randint(20, 27)]  # of 30 entries
    acknowledged = 0
    for k, target in enumerate(targets):
        child = subprocess.Popen(rlsedit_command(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=child_env(threads=1))
        try:
            wait_for_entries(child, state, target)
            time.sleep(rng.uniform(0.0, 0.15))
            if k == 0:
                # frozen mid-stream (it keeps its lock), the same command started again is refused
                os.kill(child.pid, signal.SIGSTOP)
                before = state_files(state)
                second = run_rlsedit(command, threads=1)
                assert_one_line_error(second.returncode, second.stderr, "is locked by process", str(child.pid))
                assert state_files(state) == before
            os.kill(child.pid, signal.SIGKILL)
            child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL
        count = check_whole_batches(state, records)
        assert count >= max(target - 1, acknowledged), (target, count)  # entries are never lost
        acknowledged = count

    final = run_rlsedit(command, threads=1)
    assert final.returncode == 0, final.stderr[-2000:]
    report = json.loads(final.stdout)
    assert report["already_applied"] == acknowledged * BATCH
    assert report["applied"] == N_EDITS - acknowledged * BATCH
    assert report["edits_total"] == N_EDITS and report["skipped"] == []
    assert check_whole_batches(state, records) == N_EDITS // BATCH
    resumed = cli_status(world, state)
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    for key in ("journal_entries", "edits_applied", "batches", "layer_diagnostics"):
        assert resumed[key] == reference[key], key
