"""StateLock in one process (the cross-process case is in tests/reliability)."""

from __future__ import annotations

import os

import pytest

from rlsedit.errors import StateError, StateLockedError
from rlsedit.filelock import LOCK_FILE_NAME, StateLock


def test_second_lock_is_refused_naming_directory_and_pid(tmp_path):
    with StateLock(tmp_path) as first:
        assert first.held
        assert (tmp_path / LOCK_FILE_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(StateLockedError) as info:
            StateLock(tmp_path).acquire()
        assert str(tmp_path) in str(info.value)
        assert f"process {os.getpid()}" in str(info.value)
    assert not first.held


def test_lock_can_be_taken_again_after_release(tmp_path):
    lock = StateLock(tmp_path)
    lock.acquire()
    lock.release()
    lock.release()  # idempotent
    with StateLock(tmp_path) as again:
        assert again.held


def test_acquiring_twice_through_one_object_is_an_error(tmp_path):
    with StateLock(tmp_path) as lock:
        with pytest.raises(StateError, match="already held"):
            lock.acquire()


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(StateError, match="not a directory"):
        StateLock(tmp_path / "missing").acquire()
    assert not (tmp_path / "missing").exists()


def test_a_dropped_lock_object_releases_the_lock(tmp_path):
    lock = StateLock(tmp_path)
    lock.acquire()
    del lock  # CPython frees it at once
    with StateLock(tmp_path) as again:
        assert again.held


def test_a_waiting_lock_blocks_until_the_holder_lets_go(tmp_path):
    import threading

    order = []
    first = StateLock(tmp_path)
    first.acquire()

    def second():
        with StateLock(tmp_path, wait=True):
            order.append("second holds")

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(timeout=0.5)
    assert thread.is_alive() and order == []  # still waiting on the first holder
    order.append("first releases")
    first.release()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert order == ["first releases", "second holds"]
