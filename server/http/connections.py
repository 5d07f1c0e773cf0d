"""Connections that cannot exhaust the server: a deadline for each request's headers, and a cap on open
connections. Uvicorn has neither (its `limit_concurrency` answers 503 only once the headers are parsed,
and a connection that never finishes them is held forever): 20,000 such connections took the server to
its open-file limit and `/healthz` stopped answering.

The rule, in the HTTP protocol uvicorn runs for each connection (its httptools one, subclassed):
- a connection waits for a request's headers from its opening and from the end of each answer; if they
  are not complete within `header_timeout` seconds it is closed (a keep-alive connection that sends
  nothing is closed sooner, by uvicorn's keep-alive timeout);
- beyond `max_connections` open, a new connection closes the one that has waited longest for its
  headers, since that one is either idle or too slow to be a real client; if none is waiting (every
  connection is in a request), the new one is answered 503 and closed.
So a flood of half-open connections holds at most `max_connections` sockets, for at most
`header_timeout` seconds each, and a client that sends its request at once is served meanwhile.
Why in the server and not in a proxy in front: the single server and the compose file run it with no
more parts (a proxy would protect only the deployments that have one). On Ray Serve, HTTP is Serve's own
proxy, which this does not cover.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import OrderedDict

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

FILES_KEPT = 128  # open files the process keeps for itself (model, store, pipes, logs) below its limit
LOG_EVERY = 10.0  # seconds between warnings that say how many connections were closed
_REFUSAL_BODY = (b'{"error":{"code":"too_many_connections","message":"the server holds its maximum of open '
                 b'connections, each in a request; retry in a second"}}')
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY))


def connection_cap(wanted: int) -> int:
    """`wanted`, or less where the process may open fewer files (RLIMIT_NOFILE), keeping FILES_KEPT."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted <= soft - FILES_KEPT:
        return wanted
    cap = max(1, soft - FILES_KEPT)
    log.warning("--max-connections %d lowered to %d: this process may open %d files (ulimit -n)", wanted, cap, soft)
    return cap


class ConnectionGuard:
    """Holds the connections waiting for headers, oldest first, with their timers; counts what it closes."""

    def __init__(self, header_timeout: float, max_connections: int, metrics):
        self.header_timeout = header_timeout
        self.max_connections = connection_cap(max_connections)
        self.metrics = metrics
        self.open = 0
        self.waiting: OrderedDict[HttpToolsProtocol, object] = OrderedDict()  # protocol -> its TimerHandle
        self._closed = {"header_timeout": 0, "over_capacity": 0, "refused": 0}
        self._logged_at = 0.0

    def protocol(self) -> type[HttpToolsProtocol]:
        """The protocol class for uvicorn.Config(http=...), bound to this guard."""
        guard = self

        class GuardedProtocol(HttpToolsProtocol):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                guard.opened(self)

            def on_headers_complete(self) -> None:
                guard.stop_waiting(self)
                super().on_headers_complete()

            def on_response_complete(self) -> None:
                pipelined = bool(self.pipeline)  # a request already parsed starts now: nothing to wait for
                super().on_response_complete()
                if not pipelined and not self.transport.is_closing():
                    guard.wait(self)

            def connection_lost(self, exc) -> None:
                guard.lost(self)
                super().connection_lost(exc)

        return GuardedProtocol

    def opened(self, conn: HttpToolsProtocol) -> None:
        self.open += 1
        self.metrics.connections.set(self.open)
        if self.open > self.max_connections:
            if not self.waiting:  # every other connection is in a request: this one is refused
                conn.transport.write(REFUSAL)
                conn.transport.close()
                self._count("refused")
                return
            oldest, timer = self.waiting.popitem(last=False)
            timer.cancel()
            oldest.transport.close()
            self._count("over_capacity")
        self.wait(conn)

    def wait(self, conn: HttpToolsProtocol) -> None:
        self.stop_waiting(conn)
        self.waiting[conn] = conn.loop.call_later(self.header_timeout, self._expire, conn)

    def stop_waiting(self, conn: HttpToolsProtocol) -> None:
        timer = self.waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def lost(self, conn: HttpToolsProtocol) -> None:
        self.stop_waiting(conn)
        self.open -= 1
        self.metrics.connections.set(self.open)

    def _expire(self, conn: HttpToolsProtocol) -> None:
        if self.waiting.pop(conn, None) is not None:
            conn.transport.close()
            self._count("header_timeout")

    def _count(self, reason: str) -> None:
        self.metrics.connections_closed.labels(reason).inc()
        self._closed[reason] += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:  # a flood is one line per LOG_EVERY seconds, not one per socket
            self._logged_at = now
            log.warning("closed connections: %d without a request's headers within %g s, %d waiting ones at the cap "
                        "of %d open, %d refused with every connection in a request (totals)",
                        self._closed["header_timeout"], self.header_timeout, self._closed["over_capacity"],
                        self.max_connections, self._closed["refused"])
