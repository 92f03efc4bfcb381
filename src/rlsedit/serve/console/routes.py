"""The console's static pages at ``/`` and its data routes under ``/v1/console``.

* ``GET /``, ``GET /console/{file}`` (no token: the pages hold no data; every data call
  carries the bearer token the user typed, kept in the tab's ``sessionStorage``).
* ``GET /v1/console/whoami`` [query]: the token's name and scopes (which buttons to show).
* ``POST /v1/console/ask`` [query]: greedy answers of the served (edited) model and of the
  unedited one (W0, :mod:`.unedited`) to one prompt, raw or through the chat template.
* ``GET /v1/console/edits`` [query]: ``/v1/edits``'s page, each edit with when its batch was
  accepted (the journal entry's file time) and its cached check at the served version.
* ``POST /v1/console/check`` [query]: "does the model say it now?" for edits (:mod:`.checks`).
* ``GET /v1/console/progress`` [query]: the edit batch being computed and the edits queued.
* ``GET /v1/console/forgetting`` [query]: the forgetting curve; ``GET /v1/console/drift``
  [query]: drift per weight version (:mod:`.drift`).

Editing and undoing go through ``POST /v1/edits`` and ``DELETE /v1/edits/{id}`` [edit].
"""

from __future__ import annotations

import asyncio
import os
import time
from importlib import resources
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ...eval.generation import chat_prompt, has_chat_template
from ...session.journal import JOURNAL_DIR_NAME, entry_file_name
from ..auth import Principal, require
from ..catalog import STATUSES
from ..decode import Row, Sampling
from ..errors import NotFoundError, ServeError
from ..live import fingerprint
from .checks import EditChecks
from .drift import DriftHistory
from .unedited import UneditedModel

STATIC = {"index.html": "text/html; charset=utf-8", "console.css": "text/css; charset=utf-8",
          "console.js": "text/javascript; charset=utf-8"}
# the pages load nothing from elsewhere and run no inline script
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
ASK_DEFAULT_TOKENS = 24
MAX_CHECK_IDS = 200


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1)
    mode: Literal["raw", "chat"] = "raw"
    max_tokens: int = Field(default=ASK_DEFAULT_TOKENS, ge=1)


class CheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[str] = Field(min_length=1, max_length=MAX_CHECK_IDS)


def _static(name: str) -> Response:
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name],
                    headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff"})


def register_console(app: FastAPI, service) -> None:
    """Add the console's routes to ``app`` and start recording drift per weight version."""
    session, live = service.session, service.live
    W0 = {l: session.editor.W0[l] for l in session.editor.layers}
    unedited = UneditedModel(live, W0)
    checks = EditChecks(service)
    drift = DriftHistory(live, W0, lambda: len(session.index))
    drift.record(live.version)
    live.on_publish.append(drift.record)
    accepted_at: dict[int, float] = {}  # journal seq -> its file's time (entries never change)
    query = Depends(require("query"))

    def when(seq: int | None) -> float | None:
        if seq is None:
            return None
        if seq not in accepted_at:
            try:
                accepted_at[seq] = os.stat(session.directory / JOURNAL_DIR_NAME / entry_file_name(seq)).st_mtime
            except OSError:
                return None
        return accepted_at[seq]

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _static("index.html")

    @app.get("/console/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise NotFoundError(f"no console file {name!r}")
        return _static(name)

    @app.get("/v1/console/whoami")
    async def whoami(principal: Principal = query) -> dict[str, Any]:
        return {"object": "console.principal", "name": principal.name, "scopes": sorted(principal.scopes),
                "auth": app.state.tokens is not None, "model_id": service.model_id,
                "chat": has_chat_template(live.lm.tokenizer), "weight_version": live.version}

    @app.post("/v1/console/ask", dependencies=[query])
    async def ask(body: AskRequest) -> dict[str, Any]:
        limit = service.config.max_tokens_limit
        if body.max_tokens > limit:
            raise ServeError(f"max_tokens is {body.max_tokens}, over this server's limit of {limit}",
                             code="max_tokens_too_large", param="max_tokens")
        text = body.prompt
        if body.mode == "chat":
            if not has_chat_template(live.lm.tokenizer):
                raise ServeError(f"model {service.model_id!r} has no chat template; ask in raw mode",
                                 code="no_chat_template", param="mode")
            with live.tokenizer_lock:
                text = chat_prompt(live.lm.tokenizer, body.prompt)
        ids = live.encode(text)
        if not ids:
            raise ServeError("prompt has no tokens", param="prompt")
        if live.context is not None and len(ids) + body.max_tokens > live.context:
            raise ServeError(f"the prompt is {len(ids)} tokens and max_tokens is {body.max_tokens}: together over "
                             f"the model's context of {live.context} tokens", code="context_length_exceeded",
                             param="prompt")
        edited, base = Row(list(ids), Sampling(body.max_tokens)), Row(list(ids), Sampling(body.max_tokens))
        job = service.scheduler.submit([edited])
        await asyncio.to_thread(unedited.decode, [base])
        version = await asyncio.wrap_future(job.future)
        return {"object": "console.answer", "mode": body.mode, "prompt_tokens": len(ids),
                "weight_version": version, "system_fingerprint": fingerprint(version),
                "edited": {"text": edited.text, "finish_reason": edited.finish_reason},
                "unedited": {"text": base.text, "finish_reason": base.finish_reason}}

    @app.get("/v1/console/edits", dependencies=[query])
    async def edits(status: str = Query("live"), offset: int = Query(0, ge=0), limit: int = Query(25, ge=1, le=200),
                    q: str | None = Query(None)) -> dict[str, Any]:
        if status not in STATUSES:
            raise ServeError(f"status must be one of {list(STATUSES)}, got {status!r}", param="status")
        version = live.version
        items, total = service.catalog.page(status=status, offset=offset, limit=limit, query=q)
        for item in items:
            item["accepted_at"], item["undone_at"] = when(item.get("batch")), when(item.get("undone_by"))
            item["check"] = checks.cached(item["id"])
        return {"object": "list", "data": items, "total": total, "offset": offset, "limit": limit,
                "has_more": offset + len(items) < total, "weight_version": version}

    @app.post("/v1/console/check", dependencies=[query])
    async def check(body: CheckRequest) -> dict[str, Any]:
        items = []
        for i, edit_id in enumerate(body.ids):
            item = service.catalog.get(edit_id)
            if item is None:
                raise NotFoundError(f"no edit with id {edit_id!r} in this state", code="edit_not_found",
                                    param=f"ids[{i}]")
            items.append(item)
        version, results = await checks.check(items)
        return {"object": "console.checks", "weight_version": version, "data": [results[i["id"]] for i in items]}

    @app.get("/v1/console/progress", dependencies=[query])
    async def progress() -> dict[str, Any]:
        # read without the edit worker's queue (GET /v1/state may wait behind the running batch)
        running, worker = service.worker.running, service.worker
        return {"object": "console.progress", "weight_version": live.version, "queued_edits": worker.queued_edits,
                "running": None if running is None else {"ids": list(running["ids"]), "started": running["started"],
                                                         "seconds": round(time.time() - running["started"], 3)}}

    @app.get("/v1/console/forgetting", dependencies=[query])
    async def forgetting(n: int = Query(48, ge=1, le=MAX_CHECK_IDS), seed: int = Query(0, ge=0)) -> dict[str, Any]:
        return await checks.forgetting(n, seed)

    @app.get("/v1/console/drift", dependencies=[query])
    async def drift_route() -> dict[str, Any]:
        return {"object": "console.drift", "weight_version": live.version, "layers": [str(l) for l in W0],
                "points": drift.points()}
