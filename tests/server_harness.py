"""Start the real server (`python -m server`) on a free loopback port, as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one series from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def sse_events(response) -> list[tuple[str, dict]]:
    """A server-sent event stream (an httpx streaming response), read to its end: (event, data) pairs."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def run_server(tmp_path: Path, *args: str, wait_ready: bool = True, env: dict | None = None, timeout: float = 120,
               own_group: bool = False, prefix: list[str] = ()):
    """The server on a free port; `own_group`: in a process group of its own, as a shell runs it (so that
    a test can signal the group, as Ctrl-C does); `prefix`: a command that execs the server's (its pid
    stays the server's)."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    cmd = [*prefix, sys.executable, "-m", "server", "--port", str(port), "--host", "127.0.0.1", "--threads", "2", *args]
    if "--data-dir" not in args and "--job-store" not in args:  # each server its own job store
        cmd += ["--data-dir", str(tmp_path / f"data-{port}")]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=own_group)
    server = RunningServer(proc, f"http://127.0.0.1:{port}", log)
    try:
        if wait_ready:
            try:
                wait_until(lambda: proc.poll() is not None or _ready(server.url), timeout, "the server to be ready")
            except TimeoutError:
                raise TimeoutError(f"server not ready; log:\n{server.logs()}") from None
            assert proc.poll() is None, f"server exited with {proc.returncode}; log:\n{server.logs()}"
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
