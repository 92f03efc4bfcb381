"""The FastAPI application: OpenAI-compatible query routes, edit routes, state and health.

Routes (scope in brackets; see :mod:`.auth`):

* ``GET /health`` (none), ``GET /v1/models`` [query]
* ``POST /v1/completions``, ``POST /v1/chat/completions`` [query] (``stream: true`` → SSE)
* ``POST /v1/edits`` [edit]: a record, a list, ``{"edits": [...]}`` or a JSONL body
  (``Content-Type: application/jsonl``), any layout :mod:`rlsedit.requests` parses; answers
  once the batch is durable, with the new weight version.
* ``GET /v1/edits`` [query]: ``?status=live|undone|all&offset=&limit=&q=``;
  ``GET /v1/edits/{id}`` [query]; ``DELETE /v1/edits/{id}`` [edit]: exact undo.
* ``GET /v1/state`` [query]: the session's status at the served weight version, and queues.
* ``/`` and ``/v1/console/...``: the curators' web console (:mod:`.console`).

Every error is OpenAI's error object with a 4xx/5xx status; nothing of a refused request is
applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidRequestError, RLSEditError
from ..eval.decoding import cut_at_stop
from ..requests import check_unique_ids, parse_request
from .auth import TokenTable, require
from .bodylimit import BodyLimit
from .catalog import STATUSES
from .console import register_console
from .decode import Row, Sampling
from .errors import NotFoundError, ServeError, error_fields
from .live import fingerprint
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionRequest, CompletionResponse,
                       EditBatchResponse, EditDeleted, EditPage, ModelCard, ModelList, Usage, new_id, now)
from .service import Service

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _error_response(status: int, message: str, type_: str, code: str | None = None,
                    param: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def create_app(service: Service, *, tokens: TokenTable | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    app = FastAPI(title="rlsedit", summary="a live, editable model behind an OpenAI-compatible API",
                  lifespan=lifespan)
    app.state.service = service
    app.state.tokens = tokens
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)
    _install_error_handlers(app)

    query, edit = Depends(require("query")), Depends(require("edit"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        version = service.live.version
        return {"status": "ok", "weight_version": version, "system_fingerprint": fingerprint(version)}

    @app.get("/v1/models", dependencies=[query])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=service.model_id, created=now())])

    @app.post("/v1/completions", dependencies=[query])
    async def completions(body: CompletionRequest):
        _check_model(service, body.model)
        prompts = [_encode(service, p, f"prompt[{i}]" if isinstance(body.prompt, list) else "prompt")
                   for i, p in enumerate(body.prompts)]
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        return await _answer(service, body, prompts, max_tokens, chat=False)

    @app.post("/v1/chat/completions", dependencies=[query])
    async def chat_completions(body: ChatCompletionRequest):
        _check_model(service, body.model)
        ids = _encode_chat(service, body)
        limit = body.token_limit
        if limit is None:  # OpenAI's chat default is "up to the context"; bounded by the server's limit
            room = (service.live.context or 10**9) - len(ids)
            limit = max(1, min(service.config.max_tokens_limit, room))
        return await _answer(service, body, [ids], limit, chat=True)

    @app.post("/v1/edits", dependencies=[edit])
    async def post_edits(request: Request) -> EditBatchResponse:
        requests = _parse_edits(await request.body(), request.headers.get("content-type", ""), service)
        result = await asyncio.wrap_future(service.worker.submit_edits(requests))
        return EditBatchResponse(**result)

    @app.get("/v1/edits", dependencies=[query])
    async def list_edits(status: str = Query("live"), offset: int = Query(0, ge=0),
                         limit: int = Query(50, ge=1, le=1000), q: str | None = Query(None)) -> EditPage:
        if status not in STATUSES:
            raise ServeError(f"status must be one of {list(STATUSES)}, got {status!r}", param="status")
        items, total = service.catalog.page(status=status, offset=offset, limit=limit, query=q)
        return EditPage(data=items, total=total, offset=offset, limit=limit, has_more=offset + len(items) < total)

    @app.get("/v1/edits/{edit_id}", dependencies=[query])
    async def get_edit(edit_id: str) -> dict[str, Any]:
        item = service.catalog.get(edit_id)
        if item is None:
            raise NotFoundError(f"no edit with id {edit_id!r} in this state", code="edit_not_found", param="id")
        return item

    @app.delete("/v1/edits/{edit_id}", dependencies=[edit])
    async def delete_edit(edit_id: str) -> EditDeleted:
        result = await asyncio.wrap_future(service.worker.submit_undo(edit_id))
        return EditDeleted(**result)

    @app.get("/v1/state", dependencies=[query])
    async def state() -> dict[str, Any]:
        status = service.worker.cached_status()
        if status is None:
            status = await asyncio.wrap_future(service.worker.submit_status())
        worker = service.worker
        return {"object": "state", **status,
                "server": {"model_id": service.model_id, "queued_queries": service.scheduler.queued,
                           "queued_edits": worker.queued_edits, "running_edit_batch": worker.running,
                           "decode_waves": service.scheduler.waves, "rows_decoded": service.scheduler.rows_decoded,
                           "limits": {"max_tokens": service.config.max_tokens_limit, "max_n": service.config.max_n,
                                      "max_body_bytes": service.config.max_body_bytes,
                                      "context": service.live.context}}}

    register_console(app, service)  # the curators' web console at /
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}",
                                   "invalid_request_error", "invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                            for e in errors[:5])
        return _error_response(400, f"invalid request: {message}", "invalid_request_error", "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, f"{exc.detail} ({request.method} {request.url.path})", type_)

    @app.exception_handler(RLSEditError)
    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        status, type_, code, param = error_fields(exc)
        message = str(exc) if status < 500 or isinstance(exc, ServeError) else f"internal error: {exc}"
        return _error_response(status, message, type_, code, param)


# ---- queries ------------------------------------------------------------------------------------

def _check_model(service: Service, model: str | None) -> None:
    if model is not None and model != service.model_id:
        raise NotFoundError(f"model {model!r} does not exist; this server serves {service.model_id!r}",
                            code="model_not_found", param="model")


def _encode(service: Service, text: str, param: str) -> list[int]:
    ids = service.live.encode(text)
    if not ids:
        raise ServeError(f"{param} has no tokens", param=param)
    return ids


def _encode_chat(service: Service, body: ChatCompletionRequest) -> list[int]:
    live = service.live
    tokenizer = live.lm.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(f"model {service.model_id!r} has no chat template; use /v1/completions",
                         code="no_chat_template", param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
    with live.tokenizer_lock:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = _encode(service, text, "messages")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:  # template and tokenizer both add BOS
        ids = ids[1:]
    return ids


def _check_limits(service: Service, body, prompts: list[list[int]], max_tokens: int) -> None:
    config = service.config
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    if max_tokens > config.max_tokens_limit:
        raise ServeError(f"{param} is {max_tokens}, over this server's limit of {config.max_tokens_limit}",
                         code="max_tokens_too_large", param=param)
    if body.n > config.max_n:
        raise ServeError(f"n is {body.n}, over this server's limit of {config.max_n}", param="n")
    if len(prompts) * body.n > config.max_batch_rows:
        raise ServeError(f"{len(prompts)} prompts × n={body.n} is over this server's {config.max_batch_rows} rows "
                         "per request", param="prompt")
    context = service.live.context
    for ids in prompts:
        if context is not None and len(ids) + max_tokens > context:
            raise ServeError(f"the prompt is {len(ids)} tokens and {param} is {max_tokens}: together over the "
                             f"model's context of {context} tokens", code="context_length_exceeded",
                             param="messages" if isinstance(body, ChatCompletionRequest) else "prompt")


def _rows(body, prompts: list[list[int]], max_tokens: int) -> list[Row]:
    rows = []
    for ids in prompts:
        for choice in range(body.n):
            seed = None if body.seed is None else body.seed + choice  # n choices differ, each repeatable
            rows.append(Row(list(ids), Sampling(max_tokens=max_tokens, temperature=body.temperature,
                                                top_p=body.top_p, stop=body.stop_list, seed=seed)))
    return rows


def _usage(prompts: list[list[int]], rows: list[Row]) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(r.tokens) for r in rows)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _answer(service: Service, body, prompts: list[list[int]], max_tokens: int, *, chat: bool):
    _check_limits(service, body, prompts, max_tokens)
    rows = _rows(body, prompts, max_tokens)
    if body.stream:
        return _stream(service, body, prompts, rows, chat=chat)
    try:
        version = await asyncio.wrap_future(service.scheduler.submit(rows).future)
    except asyncio.CancelledError:
        for row in rows:  # the client went away: stop decoding its rows
            row.cancelled = True
        raise
    common = dict(id=new_id("chatcmpl" if chat else "cmpl"), created=now(), model=service.model_id,
                  system_fingerprint=fingerprint(version), usage=_usage(prompts, rows))
    if chat:
        return ChatCompletionResponse(choices=[ChatChoice(index=i, message=AssistantMessage(content=r.text),
                                                          finish_reason=r.finish_reason)
                                               for i, r in enumerate(rows)], **common)
    return CompletionResponse(choices=[CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
                                       for i, r in enumerate(rows)], **common)


def _streamable(text: str, stops: tuple[str, ...]) -> str:
    """The part of a growing text that can be sent now: without an unfinished UTF-8 character
    (decoded as U+FFFD) and without a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold]


def _stream(service: Service, body, prompts: list[list[int]], rows: list[Row], *, chat: bool) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    sent = [""] * len(rows)
    closed = [False] * len(rows)
    stops = body.stop_list

    def on_step(index: int, row: Row) -> None:  # on the scheduler thread, under the read lock
        text = row.text if row.done else _streamable(row.text, stops)
        if not text.startswith(sent[index]):
            return  # the decoded prefix changed (tokenizer clean-up); the rest goes out at the end
        delta, sent[index] = text[len(sent[index]):], text
        if delta or row.done:
            loop.call_soon_threadsafe(events.put_nowait, (index, delta, row.finish_reason if row.done else None,
                                                          service.live.version))

    for i, row in enumerate(rows):
        row.on_step = lambda r, i=i: on_step(i, r)
    job = service.scheduler.submit(rows)
    job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, None))
    ident, created, model = new_id("chatcmpl" if chat else "cmpl"), now(), service.model_id

    def chunk(index: int, delta: str | None, finish: str | None, version: int, *, role: bool = False) -> str:
        if chat:
            payload = ChatCompletionChunk(id=ident, created=created, model=model,
                                          system_fingerprint=fingerprint(version),
                                          choices=[ChatChunkChoice(index=index, finish_reason=finish,
                                                                   delta=ChatDelta(role="assistant" if role else None,
                                                                                   content=delta))]).model_dump()
        else:
            payload = {"id": ident, "object": "text_completion", "created": created, "model": model,
                       "system_fingerprint": fingerprint(version),
                       "choices": [{"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(payload)}\n\n"

    async def events_stream():
        version = None
        started = [False] * len(rows)
        try:
            while True:
                item = await events.get()
                if item is None:
                    break
                index, delta, finish, version = item
                if chat and not started[index]:
                    started[index] = True
                    yield chunk(index, "", None, version, role=True)
                yield chunk(index, delta or (None if chat else ""), finish, version)
                closed[index] = closed[index] or finish is not None
            exc = job.future.exception()
            if exc is not None:
                status, type_, code, _ = error_fields(exc)
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': type_, 'param': None, 'code': code}})}\n\n"
                return
            version = job.future.result()
            for index, row in enumerate(rows):  # anything not yet sent (see on_step)
                if not closed[index]:
                    rest = cut_at_stop(row.text, stops)[0][len(sent[index]):]
                    yield chunk(index, rest, row.finish_reason, version)
            if body.include_usage:
                payload = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": model, "system_fingerprint": fingerprint(version),
                           "choices": [], "usage": _usage(prompts, rows).model_dump()}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for row in rows:  # a client that went away stops its rows at the next step
                if not row.done:
                    row.cancelled = True

    return StreamingResponse(events_stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- edits --------------------------------------------------------------------------------------

def _records(raw: bytes, content_type: str) -> list[Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServeError(f"the body is not UTF-8 text: {exc}", code="invalid_body") from None
    if "jsonl" in content_type or "ndjson" in content_type:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise ServeError(f"malformed JSON on line {lineno} of the body: {exc}", code="invalid_json") from None
        return records
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ServeError(f"malformed JSON body: {exc}", code="invalid_json") from None
    if isinstance(data, dict) and "edits" in data:
        data = data["edits"]
        if not isinstance(data, list):
            raise ServeError("'edits' must be a list of edit records", param="edits")
    return data if isinstance(data, list) else [data]


def _parse_edits(raw: bytes, content_type: str, service: Service) -> list:
    records = _records(raw, content_type)
    if not records:
        raise ServeError("no edit records in the body", param="edits")
    if len(records) > service.config.max_edits_per_request:
        raise ServeError(f"{len(records)} edits in one request, over this server's limit of "
                         f"{service.config.max_edits_per_request}", param="edits")
    requests = []
    for i, record in enumerate(records):
        if isinstance(record, dict) and "id" not in record and "case_id" not in record:
            record = {**record, "id": new_id("edit")}  # a position is no id across requests
        try:
            requests.append(parse_request(record, i))
        except InvalidRequestError as exc:
            raise ServeError(str(exc), param=f"edits[{i}]") from None
    try:
        check_unique_ids(requests)
    except InvalidRequestError as exc:
        raise ServeError(str(exc), param="edits") from None
    return requests
