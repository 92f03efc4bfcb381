"""Two workers racing for one lock, as threads (flock excludes two open files in one process too)."""

from __future__ import annotations

import threading
from typing import Callable


class Gate:
    """Called inside the expensive work: records who got there and holds them until opened."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self) -> None:
        self.entries.append(threading.current_thread().name)
        self.entered.set()
        assert self.opened.wait(timeout=10)


def race(run: Callable[[str], None], gate: Gate) -> None:
    """``run("first")`` until it is inside ``gate``, then ``run("second")``; the second must
    still be blocked half a second later (waiting on the first's lock, not working); then open
    the gate and let both finish."""
    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert gate.entered.wait(timeout=10)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()
    gate.opened.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert not first.is_alive() and not second.is_alive()
