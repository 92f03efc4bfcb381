""""Does the model say it now?": greedy generation on an edit's prompt, scored as the
generation metrics score it (:mod:`rlsedit.eval.generation`: stop at ``"."``, a newline or
EOS; at most 12 new tokens; *says it* when the SQuAD-normalised continuation begins with the
normalised target). Results are cached for the weight version they were decoded on; a new
version empties the cache. The forgetting curve is these checks on a seeded sample of the
live edits, by their position in the order the edits were accepted.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ...eval.generation import STOP_STRINGS, GenerationConfig, begins_with, sample_positions, verdict
from ..decode import Row, Sampling

MAX_NEW_TOKENS = GenerationConfig().max_new_tokens


def edit_text(item: dict[str, Any]) -> str:
    """The edit's prompt with its subject filled in (as :attr:`EditRequest.text`)."""
    return str(item["prompt"]).replace("{}", str(item["subject"]))


class EditChecks:
    def __init__(self, service) -> None:
        self._service = service
        self._lock = threading.Lock()
        self._version = -1
        self._results: dict[str, dict] = {}
        self._curves: dict[tuple[int, int], dict] = {}

    def cached(self, edit_id: str) -> dict | None:
        with self._lock:
            if self._version != self._service.live.version:
                return None
            return self._results.get(edit_id)

    def _store(self, version: int, found: dict[str, dict]) -> None:
        with self._lock:
            if version > self._version:
                self._version, self._results, self._curves = version, {}, {}
            if version == self._version:
                self._results.update(found)

    async def check(self, items: list[dict[str, Any]]) -> tuple[int, dict[str, dict]]:
        """``(weight version, id → result)`` for catalog ``items``, decoding only those not cached
        at the served version. Every result returned is of that one version."""
        service = self._service
        for _ in range(3):  # an edit published while decoding: decode again at the new version
            version = service.live.version
            out = {i["id"]: r for i in items if (r := self.cached(i["id"])) is not None}
            todo = [i for i in items if i["id"] not in out]
            if not todo:
                return version, out
            rows = [Row(service.live.encode(edit_text(i)), Sampling(max_tokens=MAX_NEW_TOKENS, stop=STOP_STRINGS))
                    for i in todo]
            size = service.config.max_batch_rows
            jobs = [service.scheduler.submit(rows[k:k + size]) for k in range(0, len(rows), size)]
            versions = {await asyncio.wrap_future(job.future) for job in jobs}
            if len(versions) != 1:
                continue
            read = versions.pop()
            found = {i["id"]: {"id": i["id"], "says": begins_with(r.text, i["target_new"]),
                               "verdict": verdict(r.text, i["target_new"]), "generation": r.text,
                               "target_new": i["target_new"], "weight_version": read}
                     for i, r in zip(todo, rows)}
            self._store(read, found)
            if read == service.live.version and all(r["weight_version"] == read for r in out.values()):
                return read, {**out, **found}
        raise RuntimeError("the weights changed during every attempt to check these edits")

    async def forgetting(self, n: int, seed: int) -> dict[str, Any]:
        """Success of a seeded sample of ``n`` live edits by position (0 = accepted first)."""
        version = self._service.live.version
        with self._lock:
            curve = self._curves.get((n, seed)) if self._version == version else None
        if curve is not None:
            return {**curve, "cached": True}
        live, total = self._service.catalog.page(status="live", offset=0, limit=10**9)
        picked = [(p, live[p]) for p in sample_positions(total, n, seed)]
        read, results = await self.check([item for _, item in picked])
        points = [{"position": p, "id": item["id"], "batch": item["batch"], "says": results[item["id"]]["says"]}
                  for p, item in picked]
        curve = {"object": "console.forgetting", "weight_version": read, "live_edits": total, "n": n, "seed": seed,
                 "points": points}
        with self._lock:
            if self._version == read:
                self._curves[(n, seed)] = curve
        return {**curve, "cached": False}
