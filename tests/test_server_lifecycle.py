"""Admission control, deadlines, disconnects, readiness and graceful shutdown of the real server."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal

import httpx
import pytest
import torch
from safetensors.torch import save_file
from server_harness import run_server, wait_until

from model import DiT, DiTConfig

LONG = {"class_id": 1, "steps": 1000, "cfg_scale": 1.0, "sampler": "ddim"}  # a few seconds on the CPU


@pytest.mark.slow
def test_queue_full_answers_429_with_retry_after(tmp_path):
    with run_server(tmp_path, "--max-queue", "1", "--max-batch-rows", "1", "--max-steps", "1000") as s:
        with s.client() as c, cf.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(c.post, "/generate", json=dict(LONG, seed=k)) for k in range(6)]
            answers = [f.result() for f in futures]
        codes = sorted(a.status_code for a in answers)
        assert codes.count(429) >= 3 and set(codes) <= {200, 429}, codes
        rejected = next(a for a in answers if a.status_code == 429)
        assert int(rejected.headers["retry-after"]) >= 1
        assert rejected.json()["error"]["code"] == "queue_full"
        assert s.metric("dit_requests_total", 'code="429"') == codes.count(429)


def test_deadline_answers_504(tmp_path):
    with run_server(tmp_path, "--request-timeout", "1", "--max-steps", "1000", "--max-batch-rows", "1") as s:
        with s.client() as c:
            r = c.post("/generate", json=LONG)
            assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
            # The expired samples were dropped: the server is idle again and serves the next request.
            wait_until(lambda: s.metric("dit_active_samples") == 0, 30, "the expired samples to be dropped")
            assert s.metric("dit_requests_finished_total", 'reason="timed_out"') == 1
            assert c.post("/generate", json={"class_id": 1, "steps": 5}).status_code == 200


@pytest.mark.slow
def test_disconnect_frees_the_slot(tmp_path):
    with run_server(tmp_path, "--max-steps", "1000", "--max-batch-rows", "1") as s:
        with pytest.raises(httpx.ReadTimeout), s.client(timeout=1.0) as c:
            c.post("/generate", json=LONG)  # the client gives up and closes the connection
        wait_until(lambda: s.metric("dit_active_samples") == 0, 10, "the abandoned sample to be dropped")
        steps = s.metric("dit_denoise_steps_total")
        assert steps < 1000  # stopped, not finished
        with s.client() as c:
            assert c.post("/generate", json={"class_id": 1, "steps": 5}).status_code == 200
        # the next request's 5 steps, and none more: the abandoned sample took no step since it was dropped
        wait_until(lambda: s.metric("dit_denoise_steps_total") >= steps + 5, 10, "the engine's metrics")
        assert s.metric("dit_denoise_steps_total") == steps + 5
        assert s.metric("dit_images_generated_total") == 1


@pytest.mark.slow
def test_readiness_turns_200_after_warm_up(tmp_path):
    # A pixel-space model big enough that loading and warming up take a moment on the CPU.
    cfg = DiTConfig(input_size=64, patch_size=2, in_channels=3, hidden_size=384, depth=12, num_heads=6, num_classes=5)
    torch.manual_seed(0)
    save_file(DiT(cfg).state_dict(), str(tmp_path / "big.safetensors"))
    (tmp_path / "big.json").write_text(json.dumps({"architecture": cfg.to_dict(), "space": "pixel"}))
    with run_server(tmp_path, "--model", str(tmp_path / "big.safetensors"), wait_ready=False) as s:
        def first_answer():
            try:
                return httpx.get(s.url + "/readyz", timeout=2)
            except httpx.TransportError:
                return None

        early = wait_until(first_answer, 60, "the port to open", interval=0.01)
        assert early.status_code == 503, "ready before the warm-up finished"
        assert early.json()["error"]["message"].startswith("not ready: ") and "retry-after" in early.headers
        assert httpx.get(s.url + "/healthz").status_code == 200  # alive while not ready
        r = httpx.post(s.url + "/generate", json={"class_id": 0})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        wait_until(lambda: httpx.get(s.url + "/readyz").status_code == 200, 120, "readiness")
        assert "warm-up took" in s.logs()


@pytest.mark.parametrize("stop,args", [("SIGTERM", ("--policy", "none")), ("Ctrl-C", ())])
def test_a_clean_stop_logs_no_error_and_no_traceback(tmp_path, stop, args):
    """SIGTERM, or Ctrl-C on `make serve` (SIGINT to the whole process group, the engine process too): the
    server drains and exits (0, or by the signal, which uvicorn raises again once it has stopped), and logs
    no ERROR, no traceback and no kill. (`--policy none` is the flag's own word: the parser once read it as
    "no value".)"""
    with run_server(tmp_path, *args, "--log-format", "text", own_group=True) as s:
        assert httpx.get(s.url + "/info").json()["policy"] == (args[1] if args else "continuous")
        assert httpx.post(s.url + "/generate", json={"class_id": 1, "steps": 3}, timeout=60).status_code == 200
        if stop == "SIGTERM":
            sent = signal.SIGTERM
            s.proc.send_signal(sent)
        else:
            sent = signal.SIGINT
            os.killpg(s.proc.pid, sent)
        assert s.proc.wait(60) in (0, -sent, 128 + sent), s.logs()  # uvicorn raises the signal again at the end
        logs = s.logs()
    assert "engine drained" in logs and "Finished server process" in logs, logs
    for bad in (" ERROR ", " CRITICAL ", "Traceback", "did not stop", "killing"):
        assert bad not in logs, logs
