"""Probes that answer under any load: `/healthz` and `/readyz` on a port of their own (`--probe-port`),
served by a small process of their own at the normal scheduling priority.

The main port's event loop runs at SCHED_IDLE (server/service/priority.py), so that the engine's steps are
never slowed by HTTP work; under a storm of requests a probe there waits behind them (seconds), and an
orchestrator would restart a healthy server. A thread of the front-end would not do: it needs the front-end's
GIL, which the idle-priority event loop holds while it waits for a CPU (a storm measured p99 0.45 s). So a
child process (stdlib only, spawned before the front-end lowers its priority) answers from readiness the
front-end writes into shared memory whenever it changes. It dies with the front-end. On Ray, the KubeRay
probes ask the raylet and Serve's proxy, not this port.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATUS_BYTES = 512


class Probes:
    """The front-end's side: start the probe process, and publish readiness to it."""

    def __init__(self, host: str, port: int):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: none of the front-end's threads
        self._state = ctx.Array("c", STATUS_BYTES)  # b"1" or b"0" (ready), then the status text
        self._state.value = b"0starting"
        ready, self._ready = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=serve, args=(host, port, self._state, self._ready), name="dit-probes",
                                daemon=True)
        self.proc.start()
        self._ready.close()
        answer = ready.recv() if ready.poll(30) else "the probe process did not start within 30 s"
        if answer != "listening":
            raise OSError(answer)

    def publish(self, ready: bool, status: str) -> None:
        self._state.value = (b"1" if ready else b"0") + status.encode()[: STATUS_BYTES - 2]


def serve(host: str, port: int, state, started) -> None:
    """The probe process's main."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front-end stops us (or dies, and so do we)
    parent = os.getppid()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            raw = state.value
            ready, status = raw[:1] == b"1", raw[1:].decode(errors="replace")
            if self.path == "/healthz":
                self._answer(200, {"status": "alive"})
            elif self.path == "/readyz" and ready:
                self._answer(200, {"status": "ready"})
            elif self.path == "/readyz":
                self._answer(503, {"error": {"code": "not_ready", "message": f"not ready: {status}", "field": None}},
                             {"Retry-After": "5"})
            else:
                self._answer(404, {"error": {"code": "not_found", "message": "this port answers only /healthz "
                                             "and /readyz", "field": None}})

        def _answer(self, code: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # probes are frequent: no access log for them
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        started.send(f"cannot listen for probes on {host}:{port}: {e}; pick another --probe-port")
        return
    server.daemon_threads = True
    started.send("listening")

    def watch_parent() -> None:  # where PR_SET_PDEATHSIG is missing
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever()
