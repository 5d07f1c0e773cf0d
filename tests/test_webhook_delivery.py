"""Webhook receivers that misbehave cannot hurt the server or each other (issue 28's cases 1-2), through a
real server and real loopback receivers: an endless answer body, a status line trickled a byte at a time,
a receiver that accepts and never answers beside a healthy one, a redirect. Receivers listen on distinct
loopback addresses (127.0.0.1, 127.0.0.2), which the server counts as distinct hosts."""

from __future__ import annotations

import re
import socketserver
import threading

import pytest
from server_harness import run_server, wait_until
from standardwebhooks import Webhook

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
QUICK = {"class_id": 1, "steps": 1, "cfg_scale": 1.0}
STUCK_JOBS = 60  # far more than the per-host limit (8), so that a shared pool would have been exhausted


class Receiver(socketserver.ThreadingTCPServer):
    """A raw HTTP receiver: reads a request, then answers as its path says. Records what it received and
    how many connections to /stuck are open at once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: str):
        super().__init__((address, 0), Handler)
        self.url = f"http://{address}:{self.server_address[1]}"
        self.deliveries: list[tuple[str, dict, bytes]] = []
        self.stuck = self.most_stuck = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.accepting = threading.Event()  # /later: 503 until set
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        try:
            self._handle(self.server)
        except OSError:  # the server hung up on us: what these receivers provoke
            pass

    def _handle(self, r: Receiver) -> None:
        method, path, _ = self.rfile.readline().decode().split(" ", 2)
        headers = {}
        while (line := self.rfile.readline().decode().strip()):
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = self.rfile.read(int(headers.get("content-length", 0)))
        with r.lock:
            r.deliveries.append((path, headers, body))
        out = self.connection
        if path == "/stuck":  # accepts, reads, never answers: holds the connection until the server hangs up
            with r.lock:
                r.stuck += 1
                r.most_stuck = max(r.most_stuck, r.stuck)
            try:
                out.settimeout(0.1)
                while not r.stop.is_set():
                    try:
                        if not out.recv(1):
                            return
                    except TimeoutError:
                        continue
            finally:
                with r.lock:
                    r.stuck -= 1
        elif path == "/huge":  # 200, then a 1.5 GB body as fast as the socket takes it
            out.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1500000000\r\n\r\n")
            chunk = b"\0" * 65536
            while not r.stop.is_set():
                out.sendall(chunk)
        elif path == "/trickle":  # the status line, one byte every half second
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                out.sendall(bytes([byte]))
                if r.stop.wait(0.5):
                    return
        elif path == "/later" and not r.accepting.is_set():  # refuses until the test says otherwise
            out.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        elif path == "/redirect":
            out.sendall(b"HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n")
        else:
            out.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.fixture(scope="module")
def receivers():
    healthy, hostile = Receiver("127.0.0.1"), Receiver("127.0.0.2")
    yield healthy, hostile
    healthy.close()
    hostile.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("webhooks"), "--webhook-allow-hosts", "127.0.0.1,127.0.0.2",
                    "--webhook-timeout", "2", "--request-timeout", "5",  # 5: the shutdown grace as well
                    env={"DIT_WEBHOOK_SECRET": SECRET}) as s:
        yield s


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def submit(client, url: str) -> str:
    answer = client.post("/jobs", json=QUICK | {"webhook_url": url})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def ended(server, result: str) -> float:
    return server.metric("dit_webhook_deliveries_total", f'result="{result}"')


def test_an_endless_answer_body_is_never_read(server, receivers):
    _, hostile = receivers
    with server.client() as c:
        before = rss_mb(server.proc.pid)
        job = submit(c, hostile.url + "/huge")
        wait_until(lambda: ended(server, "delivered") >= 1, 60, "the delivery to /huge")
        after = rss_mb(server.proc.pid)
    assert after - before < 50, f"the front-end grew {after - before:.0f} MB"
    assert f"webhook delivered: job {job} to 127.0.0.2 (HTTP 200, try 1)" in server.logs()


def test_a_trickled_answer_ends_at_the_try_deadline(server, receivers):
    _, hostile = receivers
    with server.client() as c:
        submit(c, hostile.url + "/trickle")
    # 38 bytes at 2 a second would take 19 s: the 2 s deadline ends the try, counted and logged as such
    wait_until(lambda: server.metric("dit_webhook_attempts_total", 'outcome="timeout"') >= 1, 60, "a timed-out try")
    assert "failed (timeout)" in server.logs()


def test_a_redirect_is_not_followed(server, receivers):
    healthy, _ = receivers
    with server.client() as c:
        job = submit(c, healthy.url + "/redirect")
    wait_until(lambda: f"webhook undelivered: job {job}" in server.logs(), 60, "the redirect's end")
    assert "redirects are not followed" in server.logs()
    assert [p for p, h, _ in healthy.deliveries if h["webhook-id"] == job] == ["/redirect"]  # one try, not /ok


def test_a_stuck_receiver_does_not_delay_another_host(server, receivers):
    healthy, hostile = receivers
    with server.client() as c:
        for _ in range(STUCK_JOBS):
            submit(c, hostile.url + "/stuck")
        wait_until(lambda: hostile.stuck >= 8, 60, "the stuck receiver holding the server's tries")
        job = submit(c, healthy.url + "/ok")
        wait_until(lambda: f"webhook delivered: job {job} to 127.0.0.1 (HTTP 200, try 1)" in server.logs(), 60,
                   "the healthy receiver's delivery, at its first try")
    path, headers, body = next(d for d in healthy.deliveries if d[1].get("webhook-id") == job)
    assert Webhook(SECRET).verify(body, headers)["id"] == job  # no API keys: the server's one secret signs
    assert hostile.most_stuck == 8  # the per-host limit held while 60 deliveries waited for that host



@pytest.mark.slow
def test_a_delivery_left_pending_at_shutdown_is_made_after_the_restart(tmp_path, receivers):
    healthy, _ = receivers
    data = ["--data-dir", str(tmp_path / "store"), "--webhook-allow-hosts", "127.0.0.1", "--request-timeout", "3"]
    with run_server(tmp_path, *data, env={"DIT_WEBHOOK_SECRET": SECRET}) as s, s.client() as c:
        job = submit(c, healthy.url + "/later")
        wait_until(lambda: "webhook try 1 of job " + job in s.logs(), 60, "the first try, refused")
    assert re.search(rf"webhook undelivered: job {job} .*grace period", s.logs())  # left pending at the stop
    healthy.accepting.set()
    with run_server(tmp_path, *data, env={"DIT_WEBHOOK_SECRET": SECRET}) as s:
        wait_until(lambda: f"webhook delivered: job {job}" in s.logs(), 60, "the delivery after the restart")
    tries = [(h, b) for p, h, b in healthy.deliveries if h.get("webhook-id") == job]
    assert len(tries) >= 2 and len({h["webhook-id"] for h, _ in tries}) == 1  # one message, however many tries
    headers, body = tries[-1]
    assert Webhook(SECRET).verify(body, headers)["status"] == "done"  # signed afresh, after the restart
