"""ASGI middleware around every request: request ids, access logs and per-answer metrics; body size and
time limits (API keys: server/http/auth.py). Pure ASGI (no BaseHTTPMiddleware): nothing here buffers
responses."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from ..logs import request_id_var
from .errors import ApiError, error_response

access_log = logging.getLogger("server.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """X-Request-ID (the client's if it is sane, else a new one) on every response and log line, one
    structured access-log line per request, and `on_answer(path, status, seconds)` after each one."""

    def __init__(self, app, on_answer: Callable[[str, int, float], None] | None = None):
        self.app, self.on_answer = app, on_answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        t0, status = time.monotonic(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.monotonic() - t0
            access_log.info("request", extra={"http": {
                "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round(seconds * 1000, 1), "client": (scope.get("client") or ("-",))[0]}})
            if self.on_answer is not None:
                self.on_answer(scope["path"], status, seconds)
            request_id_var.reset(token)


class BodyLimit:
    """Reads the request body up front, at most `max_bytes` (else 413) within `timeout` seconds (else
    408), so a huge or trickled body never reaches the app; then replays it."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)

        async def refuse(e: ApiError) -> None:  # answered here: the app never sees the request
            await error_response(e)(scope, receive, send)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await refuse(ApiError(413, "body_too_large", f"the body has {int(length)} bytes; at most "
                                         f"{self.max_bytes} are accepted"))
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_bytes:
                        return await refuse(ApiError(413, "body_too_large", f"the body exceeds {self.max_bytes} bytes"))
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return await refuse(ApiError(408, "body_timeout", f"the body did not arrive within {self.timeout:g} s"))
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)
