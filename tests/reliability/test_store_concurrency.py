"""One writer per state directory, across real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import rlsedit
from rlsedit.errors import StateLockedError
from rlsedit.filelock import StateLock
from rlsedit.session.store import StateStore

# Takes the lock, says so, and holds it until its stdin closes. Imports no torch: fast.
HOLDER_CODE = """
import sys
from rlsedit.filelock import StateLock

with StateLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""

# Tries the lock once and reports the outcome on stdout.
TRY_CODE = """
import sys
from rlsedit.errors import StateLockedError
from rlsedit.filelock import StateLock

try:
    with StateLock(sys.argv[1]):
        print("acquired")
except StateLockedError as exc:
    print("refused:", exc)
"""


def child_env() -> dict[str, str]:
    src = str(Path(rlsedit.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def start_holder(directory: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_CODE, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert holder.stdout.readline() == "locked\n", holder.stderr.read()
    return holder


def try_lock_in_child(directory: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", TRY_CODE, str(directory)]
    return subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=60)


def test_second_process_is_refused_naming_directory_and_holder_pid(tmp_path):
    directory = tmp_path / "state"
    StateStore.create(directory, {"m": 1}).close()
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    holder = start_holder(directory)
    try:
        with pytest.raises(StateLockedError) as info:
            StateStore.open(directory)
        assert str(directory) in str(info.value)
        assert f"process {holder.pid}" in str(info.value)
        with pytest.raises(StateLockedError, match=f"process {holder.pid}"):
            StateLock(directory).acquire()
        after = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        after.pop(".lock"), before.pop(".lock")  # the lock file holds the holder's pid
        assert after == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0, holder.stderr.read()
    with StateStore.open(directory) as store:  # free again once the holder is gone
        assert store.meta == {"m": 1}


def test_process_is_refused_while_this_process_holds_the_store(tmp_path):
    directory = tmp_path / "state"
    with StateStore.create(directory, {}):
        done = try_lock_in_child(directory)
        assert done.stdout.startswith("refused:"), done.stdout + done.stderr
        assert str(directory) in done.stdout and f"process {os.getpid()}" in done.stdout
    done = try_lock_in_child(directory)
    assert done.stdout.strip() == "acquired", done.stdout + done.stderr


def test_lock_of_a_killed_process_is_released_by_the_kernel(tmp_path):
    directory = tmp_path / "state"
    StateStore.create(directory, {}).close()
    holder = start_holder(directory)
    with pytest.raises(StateLockedError):
        StateLock(directory).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with StateStore.open(directory) as store:  # no stale lock to clean by hand
        assert store.journal_count == 0
