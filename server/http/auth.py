"""API keys: which keys the server accepts, who a request is (a hash of its key), and the ASGI middleware
that refuses a request without a valid key (401) on every path but the open ones."""

from __future__ import annotations

import hashlib
import hmac

from ..settings import Settings
from .errors import ApiError, error_response


def api_keys(settings: Settings) -> list[str]:
    """--api-keys plus the lines of --api-keys-file (blank lines and # comments skipped)."""
    keys = list(settings.api_keys)
    if settings.api_keys_file is not None:
        lines = settings.api_keys_file.read_text().splitlines()
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return keys


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
            refusal = ApiError(401, "unauthorized", "a valid API key is required: send Authorization: Bearer <key> "
                               "or X-API-Key: <key>")
            answer = error_response(refusal, {"WWW-Authenticate": 'Bearer realm="dit-serve"'})
            return await answer(scope, receive, send)
        # A new dict: the server may share the lifespan state between requests.
        scope["state"] = {**scope.get("state", {}), "owner": key_owner(given)}
        await self.app(scope, receive, send)
