"""kill -9 a real process while it appends: every acknowledged entry survives, intact.

The child prints each seq (flushed) right after ``append`` returns it, so a printed seq is an
acknowledged one. It also writes a snapshot now and then, so kills land in those writes too.
This tests crashes of the process (the page cache survives); power loss is covered only by
the fsync order (tests/unit/test_store_atomic.py), not by an experiment.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import rlsedit
from rlsedit.session.atomic import TEMP_PREFIX
from rlsedit.session.journal import entry_file_name
from rlsedit.session.store import StateStore

# Shared by parent and child: the content of entry ``seq`` and of a snapshot covering ``n``.
CONTENT_CODE = """
import torch

def entry_content(seq):
    gen = torch.Generator().manual_seed(1000 + seq)
    rows = 1 + (seq * 7919) % 200  # entries of varied size, up to ~50 KB
    meta = {"seq": seq, "note": "x" * (seq % 17)}
    return meta, {"K": torch.randn(rows, 64, generator=gen), "ids": torch.arange(seq % 5)}

def snapshot_content(covers_seq):
    gen = torch.Generator().manual_seed(5000 + covers_seq)
    return {"W": torch.randn(256, 64, generator=gen, dtype=torch.float64)}, {"covers": covers_seq}
"""

CHILD_CODE = CONTENT_CODE + """
import sys
from rlsedit.session.store import StateStore

store = StateStore.open(sys.argv[1])
while True:
    seq = store.journal_count
    meta, tensors = entry_content(seq)
    acknowledged = store.append("edit", meta, tensors)
    print(acknowledged, flush=True)
    if acknowledged % 4 == 3:
        tensors, meta = snapshot_content(acknowledged + 1)
        store.write_snapshot(tensors, meta, covers_seq=acknowledged + 1)
"""

CONTENT: dict = {}
exec(CONTENT_CODE, CONTENT)  # noqa: S102 - our own constant, so the parent checks what the child wrote


def child_env() -> dict[str, str]:
    # the child must import this very rlsedit (a worktree may differ from the installed one)
    src = str(Path(rlsedit.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def check_reopened_state(directory: Path, acknowledged: list[int]) -> int:
    """Open ``directory`` and check every acknowledged entry; return the journal count."""
    with StateStore.open(directory) as store:
        count = store.journal_count
        # every acknowledged entry is there; at most one more (committed, killed before print)
        expected_min = max(acknowledged) + 1 if acknowledged else 0
        assert expected_min <= count <= expected_min + 1, (acknowledged[-3:], count)
        seen = []
        for entry in store.entries():
            meta, tensors = CONTENT["entry_content"](entry.seq)
            assert entry.kind == "edit" and entry.meta == meta
            assert sorted(entry.tensors) == sorted(tensors)
            assert all(torch.equal(entry.tensors[k], tensors[k]) for k in tensors)
            seen.append(entry.seq)
        assert seen == list(range(count))
        if store.snapshot_covers_seq is not None:
            snap, meta, covers = store.read_snapshot()
            want_tensors, want_meta = CONTENT["snapshot_content"](covers)
            assert meta == want_meta and torch.equal(snap["W"], want_tensors["W"])
    # nothing half-written is visible after recovery
    assert list(directory.rglob(f"{TEMP_PREFIX}*")) == []
    journal_files = sorted(p.name for p in (directory / "journal").iterdir())
    assert journal_files == [entry_file_name(i) for i in range(count)]
    assert len(list(directory.glob("snapshot-*"))) <= 1
    return count


def test_kill_9_during_appends_never_loses_an_acknowledged_entry(tmp_path, caplog):
    directory = tmp_path / "state"
    StateStore.create(directory, {"test": "kill-9"}).close()
    rng = random.Random(20240611)
    acknowledged: list[int] = []
    for kill_point in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            text=True,
        )
        try:
            # let it acknowledge a random number of entries, then kill it at a random instant
            for _ in range(rng.randint(1, 12)):
                line = child.stdout.readline()
                assert line.endswith("\n"), child.stderr.read()
                acknowledged.append(int(line))
            time.sleep(rng.uniform(0.0, 0.02))
            os.kill(child.pid, signal.SIGKILL)
            rest, _ = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL
        # lines completed before the kill were acknowledged too; a cut-off last line was not
        acknowledged += [int(line) for line in rest.splitlines(keepends=True) if line.endswith("\n")]
        # strictly increasing: no seq acknowledged twice. Gaps are fine: an entry committed
        # just before a kill, but never printed, is kept and the next child continues after it.
        assert all(a < b for a, b in zip(acknowledged, acknowledged[1:])), acknowledged
        with caplog.at_level(logging.WARNING, logger="rlsedit.session"):
            check_reopened_state(directory, acknowledged)
    assert len(acknowledged) >= 5


def test_kill_between_entry_and_manifest_drops_only_the_unacknowledged_entry(tmp_path, caplog):
    """Deterministic version: the child kills itself right before the manifest write."""
    directory = tmp_path / "state"
    StateStore.create(directory, {"test": "kill-before-manifest"}).close()
    code = CONTENT_CODE + """
import os, signal, sys
from rlsedit.session import store as store_module
from rlsedit.session.store import StateStore

store = StateStore.open(sys.argv[1])
for seq in range(3):
    meta, tensors = entry_content(seq)
    print(store.append("edit", meta, tensors), flush=True)
store_module.atomic_write_json = lambda path, obj: os.kill(os.getpid(), signal.SIGKILL)
meta, tensors = entry_content(3)
store.append("edit", meta, tensors)
print("not reached", flush=True)
"""
    command = [sys.executable, "-c", code, str(directory)]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.split() == ["0", "1", "2"]
    assert (directory / "journal" / entry_file_name(3)).exists()  # written, never acknowledged
    with caplog.at_level(logging.WARNING, logger="rlsedit.session"):
        assert check_reopened_state(directory, [0, 1, 2]) == 3
    assert f"unacknowledged journal entry {directory / 'journal' / entry_file_name(3)}" in caplog.text
