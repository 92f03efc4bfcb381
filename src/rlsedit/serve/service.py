"""The running parts of a server over one state directory, and their lifetime.

``open_service`` opens the session (taking the directory's lock, replaying the journal),
copies its model for queries, and builds the catalog, scheduler and edit worker;
``start``/``close`` run and stop their threads (``close`` also snapshots and releases the
state). Routes (:mod:`.app`) only talk to this object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..session.session import Runtime, Session
from .catalog import EditCatalog
from .config import ServeConfig
from .editqueue import EditWorker
from .live import LiveModel
from .scheduler import QueryScheduler

log = logging.getLogger(__name__)


@dataclass
class Service:
    session: Session
    live: LiveModel
    catalog: EditCatalog
    scheduler: QueryScheduler
    worker: EditWorker
    config: ServeConfig
    started: bool = False
    closed: bool = False

    @property
    def model_id(self) -> str:
        return str(self.session.lm.name)

    def start(self) -> None:
        if not self.started:
            self.scheduler.start()
            self.worker.start()
            self.started = True

    def close(self) -> None:
        """Stop taking work, finish queued edits, snapshot and release the state; again is a no-op."""
        if self.closed:
            return
        self.closed = True
        if self.started:
            self.scheduler.stop()
            self.worker.stop()
        self.session.close()


def open_service(state: str | Path, *, runtime: Runtime | None = None, config: ServeConfig | None = None) -> Service:
    config = config or ServeConfig()
    session = Session.open(state, runtime=runtime or Runtime())
    try:
        catalog = EditCatalog.from_journal(session.store.entries(0))
        live = LiveModel(session.lm, session.store.journal_count)
        scheduler = QueryScheduler(live, config)
        worker = EditWorker(session, live, catalog, config)
    except BaseException:
        session.close(snapshot=False)
        raise
    log.info("serving %s (%s) at weight version %d", state, session.lm.name, live.version)
    return Service(session, live, catalog, scheduler, worker, config)
