"""A writer-preferring readers–writer lock.

Readers are decode waves (every forward pass of a batch of queries, from its first token to
its last, runs under one read lock, so a response never mixes two weight versions); the
writer copies an edit's new weights into the served model. Writer preference: once a write
waits, no new wave starts, so an acknowledged edit is served after at most the waves already
running.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
