"""Failures injected into the real server's model runner (--fault-injection) and shutdown under load: what
only a real process shows (the HTTP answers, readiness, signals). The scheduling decisions behind them
are tested in-process in tests/test_scheduler.py."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
import time

import httpx
import pytest
from server_harness import run_server, wait_until

SMALL = {"class_id": 2, "steps": 40, "cfg_scale": 2.0, "sampler": "ddim"}


FAULTY = ("--fault-injection", "--max-steps", "1000", "--max-batch-rows", "16")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """One server for the faults it survives (a device error gets its own)."""
    with run_server(tmp_path_factory.mktemp("faulty"), *FAULTY) as s:
        yield s


def arm(server, kind: str) -> None:
    assert httpx.post(server.url + "/_faults", json={"kind": kind}).status_code == 200


def test_step_error_fails_only_that_batch(faulty):
    arm(faulty, "step_error")
    with cf.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda k: httpx.post(faulty.url + "/generate", json=dict(SMALL, seed=k), timeout=60),
                                range(3)))
    failed = [a for a in answers if a.status_code == 500]
    assert failed and all(a.json()["error"]["code"] == "generation_failed" for a in failed)
    assert "injected fault" in failed[0].json()["error"]["message"]
    assert set(a.status_code for a in answers) <= {200, 500}
    assert httpx.post(faulty.url + "/generate", json=SMALL, timeout=60).status_code == 200  # still serving
    assert httpx.get(faulty.url + "/readyz").status_code == 200


def test_out_of_memory_halves_the_budget_and_retries(faulty):
    arm(faulty, "oom")
    with cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda k: httpx.post(faulty.url + "/generate", json=dict(SMALL, seed=k), timeout=60),
                                range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert "row budget halved to 8" in faulty.logs()


def test_nan_output_fails_the_request_instead_of_a_garbage_image(faulty):
    arm(faulty, "nan")
    r = httpx.post(faulty.url + "/generate", json=SMALL, timeout=60)
    assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
    assert httpx.post(faulty.url + "/generate", json=SMALL, timeout=60).status_code == 200


def test_device_error_turns_readiness_off(tmp_path):
    with run_server(tmp_path, *FAULTY) as broken:
        _device_error_turns_readiness_off(broken)


def _device_error_turns_readiness_off(faulty):
    arm(faulty, "device_lost")
    r = httpx.post(faulty.url + "/generate", json=SMALL, timeout=60)
    assert r.status_code == 503 and "device error" in r.json()["error"]["message"]
    ready = httpx.get(faulty.url + "/readyz")
    assert ready.status_code == 503 and "restart" in ready.json()["error"]["message"]
    assert httpx.get(faulty.url + "/healthz").status_code == 200  # alive, but not ready: restart it
    assert httpx.post(faulty.url + "/generate", json=SMALL, timeout=60).status_code == 503


def _streamed(url: str, body: dict, running: threading.Semaphore) -> tuple[int, list[str]]:
    """POST with progress events; release `running` once the request runs. (status, the event names)."""
    events, released = [], False
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/generate", json=body,
                                                  headers={"Accept": "text/event-stream"}) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and '"running"' in line and not released:
                running.release()
                released = True
    return r.status_code, events


@pytest.mark.slow
def test_sigterm_under_load(tmp_path):
    # The requests report when they run (events, not a sampled gauge: 300 steps can take under a second),
    # and the server runs without deadline admission: this test is about draining, not refusing.
    with run_server(tmp_path, "--max-steps", "1000", "--no-deadline-admission") as s:
        running = threading.Semaphore(0)
        with cf.ThreadPoolExecutor(4) as pool:
            inflight = [pool.submit(_streamed, s.url, dict(SMALL, steps=300, seed=k), running) for k in range(4)]
            for _ in range(4):
                assert running.acquire(timeout=30), [f.result() for f in inflight if f.done()]
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            assert not any(f.done() for f in inflight)  # each has ~300 steps to go: the drain finishes them

            def refused():  # once the signal is handled: refused at the socket, or 503 while it is still open
                try:
                    return httpx.get(s.url + "/readyz", timeout=10).status_code == 503
                except httpx.TransportError:
                    return True

            wait_until(refused, 10, "readiness to turn off")
            try:  # new work: refused at the socket, or 503 while it is still open
                late = httpx.post(s.url + "/generate", json=SMALL, timeout=10).status_code
            except httpx.TransportError:
                late = "refused"
            assert late in (503, "refused")
            for f in inflight:  # nothing admitted is lost
                status, events = f.result()
                assert status == 200 and events[-1:] == ["result"], (status, events[-3:])
        # uvicorn re-raises SIGTERM once its graceful shutdown is done, so -SIGTERM is a clean exit too.
        assert s.proc.wait(30) in (0, -signal.SIGTERM) and time.monotonic() - t0 < 30
        logs = s.logs()
        assert "readiness off" in logs and "engine drained" in logs and "Finished server process" in logs
