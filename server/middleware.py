"""ASGI middleware around every request: request ids and access logs, body size and time limits,
API-key authentication. Pure ASGI (no BaseHTTPMiddleware): nothing here buffers responses."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid

from .errors import ApiError
from .logs import request_id_var

access_log = logging.getLogger("server.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def _send_error(send, e: ApiError, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    if e.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(e.retry_after))).encode()))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    """X-Request-ID (the client's if it is sane, else a new one) on every response and log line, and one
    structured access-log line per request."""

    def __init__(self, app):
        self.app = app

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
            access_log.info("request", extra={"http": {
                "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round((time.monotonic() - t0) * 1000, 1),
                "client": (scope.get("client") or ("-",))[0]}})
            request_id_var.reset(token)


class BodyLimit:
    """Reads the request body up front, at most `max_bytes` (else 413) within `timeout` seconds (else
    408), so a huge or trickled body never reaches the app; then replays it."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, ApiError(413, "body_too_large", f"the body has {int(length)} bytes; "
                                                    f"at most {self.max_bytes} are accepted"))
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
                        return await _send_error(send, ApiError(413, "body_too_large",
                                                                f"the body exceeds {self.max_bytes} bytes"))
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return await _send_error(send, ApiError(408, "body_timeout", f"the body did not arrive within "
                                                    f"{self.timeout:g} s"))
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def key_owner(key: bytes) -> str:
    """Who a request is for the API (jobs belong to it; per-key quotas count it): a hash of its key,
    never the key itself, so that logs, job records and metrics cannot leak one."""
    return hashlib.sha256(key).hexdigest()[:16]


class ApiKeyAuth:
    """`Authorization: Bearer KEY` or `X-API-Key: KEY` on every path but the open ones; keys are compared
    in constant time (every key, every time). An authorized request carries `key_owner(key)` as
    `request.state.owner`."""

    def __init__(self, app, keys: list[str], open_paths: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = set(open_paths)

    @staticmethod
    def _given(headers: dict[bytes, bytes]) -> bytes:
        auth = headers.get(b"authorization", b"")
        return auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")

    def _authorized(self, given: bytes) -> bool:
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = self._given(dict(scope["headers"]))
        if not self._authorized(given):
            return await _send_error(send, ApiError(401, "unauthorized", "a valid API key is required: send "
                                                    "Authorization: Bearer <key> or X-API-Key: <key>"),
                                     [(b"www-authenticate", b'Bearer realm="dit-serve"')])
        # A new dict: the server may share the lifespan state between requests.
        scope["state"] = {**scope.get("state", {}), "owner": key_owner(given)}
        await self.app(scope, receive, send)
