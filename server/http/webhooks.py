"""Webhooks: when an async job ends (done, failed, cancelled, timed out), POST its status JSON to the
`webhook_url` it was submitted with.

Each delivery is signed so that the receiver can trust it and refuse replays:
    X-DiT-Timestamp: <unix seconds>
    X-DiT-Signature: sha256=<hex HMAC-SHA256(--webhook-secret, "<timestamp>.<raw body>")>
A delivery is tried at once, then again after 1, 2, 4, 8 and 16 s on a network error, a 5xx or a 429;
redirects are not followed. Deliveries run on the event loop (the device thread only resolves a
future); on shutdown, those still pending get the grace period, then are logged as undelivered.

A server that calls URLs given by its clients can be aimed at its own network (SSRF), so `webhook_url`
is refused unless the operator set a secret and listed the hosts it may name.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from ..service.job import Job
from .errors import ApiError

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds before each retry
TRY_TIMEOUT = 10.0  # seconds for one try (connect, send, answer)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-DiT-Signature value: what a receiver recomputes with the shared secret and compares."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Exact names, or suffixes written `.example.com` (any subdomain of example.com)."""
    host = host.lower().rstrip(".")
    for entry in (a.strip().lower().rstrip(".") for a in allowed):
        if entry and (host == entry or (entry.startswith(".") and host.endswith(entry))):
            return True
    return False


class Webhooks:
    def __init__(self, secret: str | None, allow_hosts: list[str], *, retry_delays=RETRY_DELAYS):
        self.secret = secret.encode() if secret else None
        self.allow_hosts = list(allow_hosts)
        self.retry_delays = tuple(retry_delays)
        self._tasks: set[asyncio.Task] = set()
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self.on_result: Callable[[str, bool], None] | None = None  # (job id, delivered), once it is known

    def check(self, url: str) -> str:
        """The URL, if this server may call it; else a 422 that says why."""
        def refuse(why: str) -> ApiError:
            return ApiError.invalid([("webhook_url", why)])

        if self.secret is None:
            raise refuse("webhooks are off on this server: the operator has set no --webhook-secret "
                         "(DIT_WEBHOOK_SECRET); poll GET /jobs/{id} instead")
        try:
            parts = urlsplit(url)
            host, _ = parts.hostname, parts.port  # .port raises on a bad port
            httpx.URL(url)  # what the deliveries' client would refuse later, refused now
        except (ValueError, httpx.InvalidURL) as e:
            raise refuse(f"not a URL: {e}") from e
        if parts.scheme not in ("http", "https") or not host:
            raise refuse("webhook_url must be an http:// or https:// URL with a host")
        if not host_allowed(host, self.allow_hosts):
            raise refuse(f"the host {host!r} is not in this server's --webhook-allow-hosts; ask its operator to "
                         "add it (webhooks may only call hosts the operator trusts)")
        return url

    def deliver_when_done(self, job: Job, url: str, payload: Callable[[], dict],
                          final: Callable[[], bool] = lambda: True) -> None:
        """Once the job ends (on whatever thread), deliver `payload()` from the event loop, if `final()`
        says the end is one (a job a job store runs again after a restart is delivered then)."""
        job_id = job.id
        loop = asyncio.get_running_loop()

        def on_done(_) -> None:  # runs on the thread that resolved the future: hand over and return
            if not final():
                log.info("webhook of job %s waits: the job runs again at the next start", job_id)
                return
            try:
                loop.call_soon_threadsafe(self._start, job_id, url, payload)
            except RuntimeError:  # the loop has closed: the process is exiting
                log.error("webhook undelivered: job %s ended after shutdown", job_id)

        job.done.add_done_callback(on_done)

    def _start(self, job_id: str, url: str, payload: Callable[[], dict]) -> None:
        if self._closed:
            log.error("webhook undelivered: job %s ended after the shutdown grace period", job_id)
            return
        body = json.dumps(payload(), separators=(",", ":")).encode()
        task = asyncio.get_running_loop().create_task(self._deliver(job_id, url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, job_id: str, url: str, body: bytes) -> None:
        try:
            delivered = await self._try(job_id, url, body)
            if self.on_result is not None:
                await asyncio.to_thread(self.on_result, job_id, delivered)
        except asyncio.CancelledError:  # left pending: a job store delivers it again after a restart
            log.error("webhook undelivered: job %s to %s was still pending at the end of the shutdown grace "
                      "period", job_id, urlsplit(url).hostname)
            raise

    async def _try(self, job_id: str, url: str, body: bytes) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=TRY_TIMEOUT,
                                             headers={"User-Agent": "dit-serve-webhook"})
        host = urlsplit(url).hostname
        last = "not tried"
        for tries, delay in enumerate((0.0, *self.retry_delays), start=1):
            if delay:
                await asyncio.sleep(delay)
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", "X-DiT-Timestamp": timestamp,
                       "X-DiT-Signature": sign(self.secret, timestamp, body), "X-DiT-Job-ID": job_id}
            try:
                answer = await self._client.post(url, content=body, headers=headers)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            code = answer.status_code
            if code < 300:
                log.info("webhook delivered: job %s to %s (HTTP %d, try %d)", job_id, host, code, tries)
                return True
            if code == 429 or code >= 500:
                last = f"HTTP {code}"
                continue
            why = "redirects are not followed; give the final URL" if code < 400 else "the receiver refused it"
            log.error("webhook undelivered: job %s to %s answered HTTP %d (%s)", job_id, host, code, why)
            return False
        log.error("webhook undelivered: job %s to %s after %d tries (last: %s)", job_id, host, tries, last)
        return False

    async def close(self, grace: float) -> None:
        """Shutdown: deliveries still pending get `grace` seconds, then are logged as undelivered."""
        await asyncio.sleep(0)  # let deliveries handed over just before this start
        self._closed = True
        pending = set(self._tasks)
        if pending:
            log.info("shutting down: %d webhook deliveries pending, waiting up to %g s", len(pending), grace)
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)  # each logs its job as undelivered
        if self._client is not None:
            await self._client.aclose()
