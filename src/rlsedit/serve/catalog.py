"""The edits of a state, live and undone, in the order they were accepted (for paging).

Built once from the journal when the server starts (every ``batch`` entry's requests, every
``undo`` entry's id) and kept current by the edit worker, which is the only writer.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

STATUSES = ("live", "undone", "all")


class EditCatalog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}  # id -> record, in acceptance order

    @classmethod
    def from_journal(cls, entries: Iterable) -> "EditCatalog":
        catalog = cls()
        for entry in entries:
            if entry.kind == "batch":
                catalog.add_batch(entry.seq, entry.meta["requests"])
            elif entry.kind == "undo":
                catalog.mark_undone(entry.meta["id"], entry.seq)
        return catalog

    def add_batch(self, seq: int, records: list[dict[str, Any]]) -> None:
        with self._lock:
            for rec in records:
                item = {k: rec[k] for k in ("id", "prompt", "subject", "target_new") if k in rec}
                if rec.get("target_true") is not None:
                    item["target_true"] = rec["target_true"]
                item.update(object="edit", batch=seq, status="live", undone_by=None)
                self._items[str(rec["id"])] = item

    def mark_undone(self, edit_id: str, seq: int) -> None:
        with self._lock:
            item = self._items.get(edit_id)
            if item is not None:
                item.update(status="undone", undone_by=seq)

    def get(self, edit_id: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._items.get(edit_id)
            return dict(item) if item is not None else None

    def page(self, *, status: str = "live", offset: int = 0, limit: int = 50, query: str | None = None
             ) -> tuple[list[dict[str, Any]], int]:
        """The ``limit`` items after ``offset`` among those with ``status`` whose id, prompt,
        subject or target contains ``query`` (case-insensitive); and how many match in all."""
        needle = query.lower() if query else None
        with self._lock:
            items = [
                dict(item) for item in self._items.values()
                if (status == "all" or item["status"] == status)
                and (needle is None or any(needle in str(item.get(k, "")).lower()
                                           for k in ("id", "prompt", "subject", "target_new")))
            ]
        return items[offset:offset + limit], len(items)
