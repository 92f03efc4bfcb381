"""Refuse request bodies over a size limit (413) before any handler parses them.

A pure ASGI middleware: a ``Content-Length`` over the limit is refused at once; a body sent
without one (chunked) is read up to the limit and refused as soon as it passes it; a body
within the limit is handed to the application unchanged.
"""

from __future__ import annotations

import json


def _error_body(limit: int) -> bytes:
    return json.dumps({"error": {"message": f"request body is over the server's limit of {limit} bytes",
                                 "type": "invalid_request_error", "param": None,
                                 "code": "request_too_large"}}).encode()


class BodyLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False  # the server itself refuses a malformed Content-Length
            if too_big:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        # no Content-Length: buffer up to the limit, then replay
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        buffered = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return buffered.pop() if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = _error_body(self.max_bytes)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
