"""The edit worker: the one thread that owns the session (edits, undos, status).

An edit is computed in the session's own model while queries read the served copy
(:class:`.live.LiveModel`), so no query waits for value targets. Order of one wave of edits:
validate each request (tokens, context, ids unseen) → ``Session.edit`` (propose → journal
append, the acknowledgement → commit) → copy the edited layers' weights into the served
copy under the write lock → answer with the new weight version. Edits that arrive within
``edit_wait_s`` of each other (up to ``edit_batch_size``) are written as one batch.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..errors import RLSEditError
from ..requests import EditRequest
from .catalog import EditCatalog
from .config import ServeConfig
from .errors import ConflictError, NotFoundError
from .threadqueue import QueueThread
from .live import LiveModel, fingerprint

log = logging.getLogger(__name__)


@dataclass
class _Job:
    kind: str  # "edit", "undo" or "status"
    requests: list[EditRequest] = field(default_factory=list)
    edit_id: str | None = None
    future: Future = field(default_factory=Future)


class EditWorker(QueueThread):
    name = "rlsedit-edit-worker"

    def __init__(self, session, live: LiveModel, catalog: EditCatalog, config: ServeConfig) -> None:
        super().__init__()
        self.session = session
        self.live = live
        self.catalog = catalog
        self.config = config
        self.running: dict[str, Any] | None = None  # the batch being computed (for /v1/state)
        self._status_cache: tuple[int, dict] | None = None

    # ---- called from request handlers ---------------------------------------------------------
    def submit_edits(self, requests: list[EditRequest]) -> Future:
        return self._submit(_Job("edit", requests=list(requests))).future

    def submit_undo(self, edit_id: str) -> Future:
        return self._submit(_Job("undo", edit_id=edit_id)).future

    def cached_status(self) -> dict | None:
        cache = self._status_cache
        return cache[1] if cache is not None and cache[0] == self.live.version else None

    def submit_status(self) -> Future:
        return self._submit(_Job("status")).future

    @property
    def queued_edits(self) -> int:
        with self._cond:
            return sum(len(j.requests) for j in self._pending)


    # ---- the worker thread ----------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._pending:
                return None
            first = self._pending.pop(0)
            if first.kind != "edit":
                return [first]
            wave, size = [first], len(first.requests)
            deadline = time.monotonic() + self.config.edit_wait_s
            while size < self.config.edit_batch_size:
                if self._pending and self._pending[0].kind == "edit" \
                        and size + len(self._pending[0].requests) <= self.config.edit_batch_size:
                    job = self._pending.pop(0)
                    wave.append(job)
                    size += len(job.requests)
                    continue
                left = deadline - time.monotonic()
                if self._pending or left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            return wave

    def _run(self) -> None:
        while True:
            wave = self._take()
            if wave is None:
                return
            try:
                if wave[0].kind == "edit":
                    self._edit_wave(wave)
                elif wave[0].kind == "undo":
                    wave[0].future.set_result(self._undo(wave[0].edit_id))
                else:
                    wave[0].future.set_result(self._status())
            except BaseException as exc:  # refused, or a bug or a disk error: answer, keep serving
                if not isinstance(exc, RLSEditError):
                    log.exception("edit worker: %s job failed", wave[0].kind)
                for job in wave:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _check_new(self, job: _Job, taken: set[str]) -> None:
        s = self.session
        for r in job.requests:
            if r.id in s.index or r.id in s.undone or r.id in taken:
                what = "undone" if r.id in s.undone else "live"
                raise ConflictError(f"edit id {r.id!r} already exists ({what}); ids must be new",
                                    code="edit_id_exists", param="id")
            s.validate(r)  # tokens exist, prompt + target fit the context
        taken.update(r.id for r in job.requests)

    def _edit_wave(self, wave: list[_Job]) -> None:
        valid, taken = [], set()
        for job in wave:
            try:
                self._check_new(job, taken)
                valid.append(job)
            except RLSEditError as exc:
                job.future.set_exception(exc)
        if not valid:
            return
        if len(valid) > 1:
            self._apply(valid, [r for job in valid for r in job.requests])
            if all(j.future.done() for j in valid):
                return
            valid = [j for j in valid if not j.future.done()]  # the merged batch failed: alone
        for job in valid:
            self._apply([job], job.requests)

    def _apply(self, jobs: list[_Job], requests: list[EditRequest]) -> None:
        """Apply ``requests`` (of ``jobs``) and publish what became durable; answers the jobs
        whose edits all applied, and (when merged with others) leaves failed ones unanswered."""
        s = self.session
        self.running = {"ids": [r.id for r in requests], "started": time.time()}
        error: BaseException | None = None
        start = time.perf_counter()
        try:
            s.edit(requests, batch_size=self.config.edit_batch_size, progress=False)
        except Exception as exc:  # earlier batches may be durable: they are published below
            error = exc
        finally:
            self.running = None
        seconds = time.perf_counter() - start
        applied = [r for r in requests if r.id in s.index]
        if applied:  # durable now: serve them, whatever happened to later batches
            by_seq: dict[int, list[dict]] = {}
            for r in applied:
                by_seq.setdefault(s.index[r.id][0], []).append(r.to_record())
            for seq in sorted(by_seq):
                self.catalog.add_batch(seq, by_seq[seq])
            self.live.publish(s.lm, s.editor.layers, s.store.journal_count)
        version = self.live.version
        for job in jobs:
            ids = [r.id for r in job.requests]
            done = [i for i in ids if i in s.index]
            if len(done) == len(ids):
                job.future.set_result({"object": "edit.batch", "ids": ids, "applied": len(ids),
                                       "weight_version": version, "system_fingerprint": fingerprint(version),
                                       "seconds": round(seconds, 3)})
            elif done or len(jobs) == 1:
                note = f" (applied and durable before the failure: {', '.join(done)})" if done else \
                    "; nothing was applied"
                job.future.set_exception(type(error)(f"{error}{note}") if error is not None
                                         else RuntimeError("edits were not applied"))

    def _undo(self, edit_id: str) -> dict:
        s = self.session
        if edit_id in s.undone:
            raise ConflictError(f"edit {edit_id!r} was already undone", code="edit_already_undone")
        if edit_id not in s.index:
            raise NotFoundError(f"no edit with id {edit_id!r} in this state", code="edit_not_found", param="id")
        s.undo(edit_id)
        seq = s.store.journal_count - 1
        self.catalog.mark_undone(edit_id, seq)
        self.live.publish(s.lm, s.editor.layers, s.store.journal_count)
        version = self.live.version
        return {"id": edit_id, "object": "edit", "deleted": True, "weight_version": version,
                "system_fingerprint": fingerprint(version)}

    def _status(self) -> dict:
        version = self.live.version
        cache = self._status_cache
        if cache is None or cache[0] != version:
            status = self.session.status()
            status["weight_version"] = version
            status["system_fingerprint"] = fingerprint(version)
            self._status_cache = (version, status)
        return self._status_cache[1]
