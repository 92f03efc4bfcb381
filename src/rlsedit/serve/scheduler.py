"""Dynamic batching: concurrent queries share decode waves.

One thread takes the queries waiting (up to ``max_batch_rows`` rows; after the first it waits
``batch_wait_s`` for others to join), decodes them together under the live model's read lock
(:func:`.decode.decode_rows`: one left-padded batch, one KV cache), and answers each with the
weight version it read. Queries that arrive during a wave join the next one, so throughput
grows with the number of clients instead of queueing them one by one.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from .config import ServeConfig
from .decode import Row, decode_rows
from .live import LiveModel
from .threadqueue import QueueThread

log = logging.getLogger(__name__)


@dataclass
class QueryJob:
    """The rows of one request (prompts × n); ``future`` resolves to the weight version read."""

    rows: list[Row]
    future: Future = field(default_factory=Future)


class QueryScheduler(QueueThread):
    name = "rlsedit-query-scheduler"

    def __init__(self, live: LiveModel, config: ServeConfig) -> None:
        super().__init__()
        self.live = live
        self.config = config
        self.waves = 0  # decode waves run (for /v1/state)
        self.rows_decoded = 0

    def submit(self, rows: list[Row]) -> QueryJob:
        return self._submit(QueryJob(rows))

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def _take(self) -> list[QueryJob] | None:
        """The jobs of the next wave, or None when stopping."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = time.monotonic() + self.config.batch_wait_s
            while sum(len(j.rows) for j in self._pending) < self.config.max_batch_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            wave, rows = [], 0
            while self._pending:
                size = len(self._pending[0].rows)
                if wave and rows + size > self.config.max_batch_rows:
                    break
                wave.append(self._pending.pop(0))
                rows += size
            return wave

    def _run(self) -> None:
        while True:
            wave = self._take()
            if wave is None:
                break
            rows = [r for job in wave for r in job.rows]
            try:
                with self.live.lock.read():
                    version = self.live.version
                    decode_rows(self.live.lm, rows, self.live.decode)
            except BaseException as exc:  # answer every waiting client; keep serving
                log.exception("decode wave of %d rows failed", len(rows))
                for job in wave:
                    job.future.set_exception(exc)
                continue
            self.waves += 1
            self.rows_decoded += len(rows)
            for job in wave:
                job.future.set_result(version)
