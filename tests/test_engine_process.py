"""The engine in its own process, as a user runs it: its death is answered and ends the server, it dies
with the server, and the front door refuses what could not be served in time or beyond a key's quota."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from server_harness import free_port, run_server, wait_until

LONG = {"class_id": 1, "steps": 1000, "cfg_scale": 1.0, "sampler": "ddim", "cache": "off"}  # a row each step


def engine_pid(server) -> int:
    found = wait_until(lambda: re.search(r"engine process (\d+) started", server.logs()), 30, "the engine pid")
    return int(found.group(1))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_the_front_end_runs_below_the_engine(tmp_path):
    """The HTTP process's event loop at SCHED_IDLE and nice 19 (server/service/priority.py); the engine process at
    the priority it was started with."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with run_server(tmp_path) as s:
        engine = engine_pid(s)
        if "could not switch to SCHED_IDLE" in s.logs() and os.environ.get("CI") != "true":
            pytest.skip("this machine forbids SCHED_IDLE (a sandbox): the server runs at nice 19 alone")
        assert os.sched_getscheduler(s.proc.pid) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, s.proc.pid) == min(19, base + 19)
        assert os.sched_getscheduler(engine) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, engine) == base


def test_probes_answer_from_a_process_at_normal_priority(tmp_path):
    """`--probe-port`: /healthz and /readyz on a port of their own, served by a process that kept the normal
    policy while the front-end's event loop runs at SCHED_IDLE (so that an orchestrator's probe does not
    queue behind a storm of requests), and that ends with the server."""
    port = free_port()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with run_server(tmp_path, "--probe-port", str(port)) as s:
        probes = f"http://127.0.0.1:{port}"
        assert httpx.get(probes + "/healthz").json() == {"status": "alive"}
        assert httpx.get(probes + "/readyz").json() == {"status": "ready"}
        other = httpx.get(probes + "/generate")
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
        prober = int(re.search(r"probes \(/healthz, /readyz\) on \S+, process (\d+)", s.logs()).group(1))
        assert prober in map(int, Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split())
        assert os.sched_getscheduler(prober) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, prober) == base
        if "could not switch to SCHED_IDLE" not in s.logs():
            assert os.sched_getscheduler(s.proc.pid) == os.SCHED_IDLE  # the event loop's thread
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(60)
    wait_until(lambda: not alive(prober), 10, "the probe process to end with the server")


def test_where_sched_idle_is_forbidden_the_front_end_keeps_nice_and_says_so(monkeypatch, caplog):
    from server.service import priority

    def forbidden(*args):
        raise PermissionError("sched_setscheduler: operation not permitted")

    niced = []
    monkeypatch.setattr(os, "sched_setscheduler", forbidden)
    monkeypatch.setattr(os, "setpriority", lambda which, who, value: niced.append(value))
    priority.lower_priority(19, sched_idle=True)
    assert niced == [os.getpriority(os.PRIO_PROCESS, 0) + 19]
    assert "could not switch to SCHED_IDLE" in caplog.text and "nice 19 only" in caplog.text


@pytest.mark.slow
def test_engine_death_answers_503_turns_readiness_off_and_exits_non_zero(tmp_path):
    with run_server(tmp_path, "--max-steps", "1000", "--max-batch-rows", "1") as s, cf.ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(httpx.post, s.url + "/generate", json=LONG, timeout=60)
        wait_until(lambda: s.metric("dit_active_samples") > 0, 30, "the request to be in flight")
        os.kill(engine_pid(s), signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: httpx.get(s.url + "/readyz", timeout=2).status_code == 503, 2, "readiness to turn off")
        answer = inflight.result()
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_died"
        assert s.proc.wait(10) != 0 and time.monotonic() - killed < 10
        assert "engine process exited" in s.logs()


@pytest.mark.slow
def test_the_engine_dies_with_the_server(tmp_path):
    with run_server(tmp_path) as s:
        pid = engine_pid(s)
        assert alive(pid)
        s.proc.kill()
        s.proc.wait(10)
        wait_until(lambda: not alive(pid), 10, "the engine to end with its parent")


@pytest.mark.slow
def test_deadline_aware_admission_refuses_what_cannot_finish_in_time(tmp_path):
    with run_server(tmp_path, "--max-steps", "1000", "--request-timeout", "1", "--job-timeout", "600") as s, \
            s.client() as c:
        assert c.post("/generate", json={"class_id": 1, "steps": 20}).status_code == 200  # measures a step
        busy = c.post("/jobs", json=dict(LONG, steps=1000)).json()  # a backlog (an idle engine admits anything)
        wait_until(lambda: c.get(busy["status_url"]).json()["status"] == "running", 30, "the job to run")
        admitted = s.metric("dit_requests_admitted_total")
        r = c.post("/generate", json=LONG)  # 1000 steps: well over a second at any measured step time
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
        assert s.metric("dit_requests_admitted_total") == admitted  # refused at the door, never admitted
        assert s.metric("dit_requests_finished_total", 'reason="timed_out"') == 0
        c.delete(busy["status_url"])


@pytest.mark.slow
def test_one_key_flooding_gets_its_quota_and_the_other_key_is_served(tmp_path):
    args = ("--api-keys", "key-a,key-b", "--max-requests-per-key", "2", "--max-batch-rows", "2",
            "--max-steps", "1000")
    with run_server(tmp_path, *args) as s, cf.ThreadPoolExecutor(6) as pool:
        flood = [pool.submit(httpx.post, s.url + "/generate", json=dict(LONG, steps=300, seed=k), timeout=120,
                             headers={"X-API-Key": "key-a"}) for k in range(5)]
        wait_until(lambda: s.metric("dit_requests_admitted_total") >= 2, 30, "key-a's requests to be admitted")
        other = httpx.post(s.url + "/generate", json={"class_id": 2, "steps": 10}, timeout=120,
                           headers={"X-API-Key": "key-b"})
        assert other.status_code == 200
        codes = sorted(f.result().status_code for f in flood)
        assert codes == [200, 200, 429, 429, 429]
        refused = [f.result() for f in flood if f.result().status_code == 429]
        assert all(r.json()["error"]["code"] == "key_quota_exceeded" and "retry-after" in r.headers
                   for r in refused)
