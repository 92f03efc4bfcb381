"""A worker thread fed by a queue of jobs that each carry a Future: the shared plumbing of
the query scheduler and the edit worker (start, stop, submit, answer what is left)."""

from __future__ import annotations

import threading
from .errors import UnavailableError


class QueueThread:
    """Subclasses implement ``_run`` (the thread's loop) and take jobs from ``_pending`` under
    ``_cond``; a job is any object with a ``future``."""

    name = "rlsedit-worker"

    def __init__(self) -> None:
        self._pending: list = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _submit(self, job):
        with self._cond:
            if self._stopping:
                job.future.set_exception(UnavailableError("the server is shutting down"))
            else:
                self._pending.append(job)
                self._cond.notify_all()
        return job

    def _main(self) -> None:
        try:
            self._run()
        finally:
            with self._cond:  # answer what is left so no handler waits forever
                for job in self._pending:
                    if not job.future.done():
                        job.future.set_exception(UnavailableError("the server is shutting down"))
                self._pending.clear()

    def _run(self) -> None:
        raise NotImplementedError
