"""Webhooks: when an async job or a dataset ends (done, failed, cancelled, timed out), POST its status JSON
to the `webhook_url` it was submitted with, signed as the Standard Webhooks spec says (standardwebhooks.com;
the `standardwebhooks` package signs here and verifies at the receiver):
    webhook-id: <the job's or dataset's id>  the same on every try (and after a restart): receivers dedupe by it
    webhook-timestamp: <unix seconds>   fresh on every try: receivers refuse ones older than 5 minutes
    webhook-signature: v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<raw body>")>

Secrets: the operator's `--webhook-secret` is a `whsec_` secret. With API keys, each key's deliveries are
signed with a secret of its own, derived from the server's and the key's hash (`key_secret`), which the
key's owner reads at GET /webhooks/secret: a client can verify its own deliveries and cannot sign another
key's. Derived rather than listed beside each key so that the key file stays a list of keys and one
server secret rotates them all.

A delivery is tried at once, then again after 1, 2, 4, 8 and 16 s on a network error, a timeout, a 5xx or
a 429; redirects are not followed. No receiver can hurt the server or another receiver: a try has one
deadline (--webhook-timeout) for connect, send and the answer's status line; the answer's body is never
read; at most `PER_HOST` tries run at once per receiver host (the others wait their turn, while other
hosts' deliveries keep their own schedule: the connection pool has no global cap to exhaust).
Deliveries run on the event loop (the device thread only resolves a future); on shutdown, those still
pending get the grace period, then are logged as undelivered, and the job store delivers them at the
next start.

A server that calls URLs given by its clients can be aimed at its own network (SSRF), so `webhook_url`
is refused unless the operator set a secret and listed the hosts it may name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from ..service.job import Job
from ..service.metrics import Metrics
from .errors import ApiError

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds before each retry
PER_HOST = 8  # tries in flight at once per receiver host: a stuck receiver holds at most this many sockets
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
NEW_SECRET = ("python -c \"import base64, secrets; print('whsec_' + base64.b64encode(secrets.token_bytes(32))"
              ".decode())\"")


def secret_problem(secret: str) -> str | None:
    """Why `secret` is no Standard Webhooks secret (None if it is one). The library would take any text,
    base64-decoding what it can into a short key, so anything but `whsec_` + base64 of >= 24 bytes is
    refused at start."""
    if not secret.startswith(SECRET_PREFIX):
        return f"it must start with {SECRET_PREFIX!r}"
    text = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)  # padded or not, as the library
    except binascii.Error:
        return f"what follows {SECRET_PREFIX!r} must be base64"
    if len(key) < MIN_SECRET_BYTES:
        return f"it holds {len(key)} bytes; at least {MIN_SECRET_BYTES} random bytes are needed"
    return None


def key_secret(server_secret: str, owner: str) -> str:
    """The whsec_ secret of one API key (by its hash, server/http/auth.py): an HMAC of the hash under the
    server's secret, so that it can be recomputed at any start and by every front-end, and cannot be
    computed without the server's secret."""
    key = Webhook(server_secret)._whsecret  # the library's reading of the secret, padding and all
    derived = hmac.new(key, b"dit-serve webhook secret of key " + owner.encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(derived).decode()


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Exact names, or suffixes written `.example.com` (any subdomain of example.com)."""
    host = host.lower().rstrip(".")
    for entry in (a.strip().lower().rstrip(".") for a in allowed):
        if entry and (host == entry or (entry.startswith(".") and host.endswith(entry))):
            return True
    return False


class Webhooks:
    def __init__(self, secret: str | None, allow_hosts: list[str], metrics: Metrics, *, keyed: bool,
                 retry_delays=RETRY_DELAYS, try_deadline: float = 10.0, per_host: int = PER_HOST):
        self.secret = secret
        self.keyed = keyed  # API keys configured: each key's deliveries are signed with its own secret
        self.allow_hosts = list(allow_hosts)
        self.metrics = metrics
        self.retry_delays = tuple(retry_delays)
        self.try_deadline = try_deadline
        self._hosts: defaultdict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(per_host))
        self._signers: dict[str | None, Webhook] = {}
        self._tasks: set[asyncio.Task] = set()
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self.on_result: Callable[[str, bool], None] | None = None  # (job id, delivered), once it is known

    def secret_of(self, owner: str | None) -> str:
        """The whsec_ secret that signs deliveries of jobs of `owner` (a key's hash; None without keys)."""
        if self.secret is None:  # a delivery left by a process that had a secret, to one that has none
            raise ValueError("this server has no --webhook-secret to sign with")
        return key_secret(self.secret, owner) if self.keyed and owner is not None else self.secret

    def _signer(self, owner: str | None) -> Webhook:
        if owner not in self._signers:
            self._signers[owner] = Webhook(self.secret_of(owner))
        return self._signers[owner]

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
        job_id, owner = job.id, job.request.owner
        loop = asyncio.get_running_loop()

        def on_done(_) -> None:  # runs on the thread that resolved the future: hand over and return
            if not final():
                log.info("webhook of job %s waits: the job runs again at the next start", job_id)
                return
            self.deliver_soon(loop, job_id, owner, url, payload)

        job.done.add_done_callback(on_done)

    def deliver_soon(self, loop: asyncio.AbstractEventLoop, job_id: str, owner: str | None, url: str,
                     payload: Callable[[], dict], on_result: Callable[[str, bool], None] | None = None) -> None:
        """From any thread: deliver `payload()` from `loop` (the app's); `on_result` (else the server's
        one) hears the outcome."""
        try:
            loop.call_soon_threadsafe(self._start, job_id, owner, url, payload, on_result or self.on_result)
        except RuntimeError:  # the loop has closed: the process is exiting
            log.error("webhook undelivered: %s ended after shutdown", job_id)

    def _start(self, job_id: str, owner: str | None, url: str, payload: Callable[[], dict],
               on_result: Callable[[str, bool], None] | None) -> None:
        if self._closed:
            log.error("webhook undelivered: %s ended after the shutdown grace period", job_id)
            return
        body = json.dumps(payload(), separators=(",", ":")).encode()
        task = asyncio.get_running_loop().create_task(self._deliver(job_id, owner, url, body, on_result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, job_id: str, owner: str | None, url: str, body: bytes,
                       on_result: Callable[[str, bool], None] | None) -> None:
        try:
            try:
                delivered = await self._tries(job_id, owner, url, body)
            except Exception:  # a bug here must still end the delivery, logged and recorded
                log.exception("webhook undelivered: job %s: the delivery failed", job_id)
                delivered = False
            self.metrics.webhook_deliveries.labels("delivered" if delivered else "undelivered").inc()
            if on_result is not None:
                await asyncio.to_thread(on_result, job_id, delivered)
        except asyncio.CancelledError:  # left pending: a job store delivers it again after a restart
            log.error("webhook undelivered: job %s to %s was still pending at the end of the shutdown grace "
                      "period", job_id, urlsplit(url).hostname)
            raise

    async def _tries(self, job_id: str, owner: str | None, url: str, body: bytes) -> bool:
        host = urlsplit(url).hostname or ""
        last = "not tried"
        for tries, delay in enumerate((0.0, *self.retry_delays), start=1):
            if delay:
                await asyncio.sleep(delay)
            async with self._hosts[host]:
                outcome, code = await self._try(job_id, owner, url, body)
            self.metrics.webhook_attempts.labels(outcome).inc()
            if outcome == "delivered":
                log.info("webhook delivered: job %s to %s (HTTP %d, try %d)", job_id, host, code, tries)
                return True
            if outcome == "refused":
                why = "redirects are not followed; give the final URL" if code < 400 else "the receiver refused it"
                log.error("webhook undelivered: job %s to %s answered HTTP %d (%s)", job_id, host, code, why)
                return False
            last = f"HTTP {code}" if code else outcome
            log.warning("webhook try %d of job %s to %s failed (%s)", tries, job_id, host, last)
        log.error("webhook undelivered: job %s to %s after %d tries (last: %s)", job_id, host, tries, last)
        return False

    async def _try(self, job_id: str, owner: str | None, url: str, body: bytes) -> tuple[str, int]:
        """One try: (outcome, HTTP status or 0). Every exception is an outcome, never an escape."""
        if self._client is None:
            # No pool cap: PER_HOST bounds each host, so that one host cannot hold every connection.
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.try_deadline,
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
                                             headers={"User-Agent": "dit-serve-webhook"})
        try:
            now = datetime.now(UTC)
            headers = {"Content-Type": "application/json", "webhook-id": job_id,
                       "webhook-timestamp": str(int(now.timestamp())),
                       "webhook-signature": self._signer(owner).sign(job_id, now, body)}
            async with asyncio.timeout(self.try_deadline):
                # The answer's status line and headers only: leaving the block unread closes the
                # connection instead of reading a body the receiver may make endless.
                async with self._client.stream("POST", url, content=body, headers=headers) as answer:
                    code = answer.status_code
        except TimeoutError:
            return "timeout", 0
        except httpx.HTTPError as e:
            log.debug("webhook try of job %s: %s: %s", job_id, type(e).__name__, e)
            return "network_error", 0
        except Exception:  # whatever else a receiver provokes ends this try, logged, never the task
            log.exception("webhook try of job %s to %s failed unexpectedly", job_id, urlsplit(url).hostname)
            return "error", 0
        if code < 300:
            return "delivered", code
        return ("retryable_status", code) if code == 429 or code >= 500 else ("refused", code)

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
