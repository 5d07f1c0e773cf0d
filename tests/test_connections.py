"""Connections cannot exhaust the server (issue 28, case 7): a request's headers have a deadline and open
connections are capped (server/http/connections.py). The rule is tested in-process with fake connections
and a fake clock; the real server shows that a flood of half-open connections leaves /healthz answering,
and that a request longer than the header deadline is not cut."""

from __future__ import annotations

import socket

import httpx
import pytest
from server_harness import run_server, wait_until

from server.http.connections import REFUSAL, ConnectionGuard
from server.service.metrics import Metrics

# ---- the rule, with fakes ------------------------------------------------------------------------------


class FakeLoop:
    def __init__(self):
        self.now, self.timers = 0.0, []

    def call_later(self, delay, fn, *args):
        timer = FakeTimer(self.now + delay, fn, args)
        self.timers.append(timer)
        return timer

    def advance(self, seconds):
        self.now += seconds
        for t in [t for t in self.timers if t.at <= self.now and not t.cancelled]:
            t.cancelled = True
            t.fn(*t.args)


class FakeTimer:
    def __init__(self, at, fn, args):
        self.at, self.fn, self.args, self.cancelled = at, fn, args, False

    def cancel(self):
        self.cancelled = True


class FakeTransport:
    def __init__(self):
        self.closed, self.written = False, b""

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


class FakeConnection:
    def __init__(self, loop):
        self.loop, self.transport = loop, FakeTransport()


@pytest.fixture
def guard():
    return ConnectionGuard(header_timeout=5.0, max_connections=3, metrics=Metrics())


def open_(guard, loop, n):
    conns = [FakeConnection(loop) for _ in range(n)]
    for c in conns:
        guard.opened(c)
    return conns


def test_headers_not_complete_in_time_close_the_connection(guard):
    loop = FakeLoop()
    slow, quick = open_(guard, loop, 2)
    guard.stop_waiting(quick)  # its headers arrived: it is in a request, which may take any time
    loop.advance(4.9)
    assert not slow.transport.closed
    loop.advance(0.2)
    assert slow.transport.closed and not quick.transport.closed
    guard.wait(quick)  # its answer ended: it waits for the next request's headers, with a fresh deadline
    loop.advance(4.9)
    assert not quick.transport.closed
    loop.advance(0.2)
    assert quick.transport.closed
    assert guard.metrics.connections_closed.labels("header_timeout")._value.get() == 2


def test_over_the_cap_the_connection_waiting_longest_is_closed(guard):
    loop = FakeLoop()
    a, b, c = open_(guard, loop, 3)
    guard.stop_waiting(a)  # in a request: never closed for the cap
    (d,) = open_(guard, loop, 1)
    assert b.transport.closed and not a.transport.closed and not c.transport.closed and not d.transport.closed
    guard.lost(b)
    assert guard.open == 3


def test_over_the_cap_with_every_connection_in_a_request_the_new_one_is_refused(guard):
    loop = FakeLoop()
    busy = open_(guard, loop, 3)
    for conn in busy:
        guard.stop_waiting(conn)
    (late,) = open_(guard, loop, 1)
    assert late.transport.closed and late.transport.written == REFUSAL
    assert b"503" in REFUSAL.split(b"\r\n")[0] and not any(c.transport.closed for c in busy)
    head, body = REFUSAL.split(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head


# ---- the real server -------------------------------------------------------------------------------------

HALF_OPEN = 200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("connections"), "--header-timeout", "1", "--max-connections", "32") as s:
        yield s


def half_open(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line that ends the headers
    return s


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_half_open_connections_are_bounded_and_healthz_answers(server):
    port = int(server.url.rsplit(":", 1)[1])
    socks = [half_open(port) for _ in range(HALF_OPEN)]
    try:
        # Beyond the cap of 32, each new connection closed the oldest half-open one.
        wait_until(lambda: sum(map(closed_by_server, socks)) >= HALF_OPEN - 32, 30, "the server closing the surplus")
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        # Within the header deadline (1 s), the rest are closed as well.
        wait_until(lambda: all(map(closed_by_server, socks)), 30, "every half-open connection closed")
    finally:
        for s in socks:
            s.close()
    assert server.metric("dit_http_connections_closed_total", 'reason="over_capacity"') >= HALF_OPEN - 32
    assert server.metric("dit_http_connections_closed_total", 'reason="header_timeout"') >= 1
    assert "closed connections:" in server.logs()  # a flood is logged (once per 10 s), not silent


def test_a_request_longer_than_the_header_deadline_is_not_cut(server):
    with server.client() as c:  # ~1.5-2 s of generation on this CPU, against a 1 s header deadline
        r = c.post("/generate", json={"class_id": 3, "steps": 120, "num_images": 4, "seed": 1})
        assert r.status_code == 200, r.text
        assert c.get("/healthz").status_code == 200  # the same connection, kept alive across the wait
