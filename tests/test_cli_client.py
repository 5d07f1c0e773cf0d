"""dit-generate against a real server, with 429 retries, and in local mode."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys

import httpx
from server_harness import ROOT, run_server, wait_until


def dit_generate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dit_client", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_server_mode_by_name_and_local_mode_give_the_server_image(tmp_path):
    with run_server(tmp_path) as s:
        out = dit_generate("sneak", "--url", s.url, "--seed", "77", "--steps", "15", "--out", str(tmp_path / "a.png"))
        assert out.returncode == 0, out.stderr
        assert "Sneaker, seed 77" in out.stdout and "step" in out.stderr  # the progress bar
        cfg = httpx.get(s.url + "/info").json()["defaults"]["cfg_scale"]
        direct = httpx.post(s.url + "/generate", json={"class_id": 7, "seed": 77, "steps": 15, "cfg_scale": cfg},
                            timeout=60)
        assert (tmp_path / "a.png").read_bytes() == direct.content
        many = dit_generate("7", "--url", s.url, "--seed", "1", "--steps", "5", "--count", "3",
                            "--out", str(tmp_path / "m.png"), "--quiet")
        assert many.returncode == 0 and sorted(p.name for p in tmp_path.glob("m-*.png")) == [
            "m-1.png", "m-2.png", "m-3.png"]
    local = dit_generate("Sneaker", "--local", "--seed", "77", "--steps", "15", "--out", str(tmp_path / "l.png"))
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "l.png").read_bytes() == direct.content  # same pipeline, same bytes


def test_retries_429_after_retry_after(tmp_path):
    with run_server(tmp_path, "--max-queue", "1", "--max-batch-rows", "1", "--max-steps", "1000") as s:
        long = {"class_id": 1, "steps": 400, "cfg_scale": 1.0, "sampler": "ddim"}
        with cf.ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(httpx.post, s.url + "/generate", json=dict(long, seed=0), timeout=120)]
            wait_until(lambda: s.metric("dit_active_samples") == 1, 20, "the first request to run")
            busy.append(pool.submit(httpx.post, s.url + "/generate", json=dict(long, seed=1), timeout=120))
            wait_until(lambda: s.metric("dit_queue_depth") == 1, 20, "the queue to fill")
            out = dit_generate("Trouser", "--url", s.url, "--steps", "5", "--out", str(tmp_path / "t.png"),
                               "--retries", "20")
            assert [f.result().status_code for f in busy] == [200, 200]
        assert out.returncode == 0, out.stderr
        assert "server busy (429); retrying" in out.stderr and (tmp_path / "t.png").exists()


def test_errors_exit_non_zero_with_a_message(tmp_path):
    with run_server(tmp_path) as s:
        unknown = dit_generate("spaceship", "--url", s.url)
        assert unknown.returncode == 1 and "matches 0 classes" in unknown.stderr
        bad = dit_generate("0", "--url", s.url, "--steps", "5000")
        assert bad.returncode == 1 and "422" in bad.stderr and "steps" in bad.stderr
    gone = dit_generate("0", "--url", "http://127.0.0.1:9")
    assert gone.returncode == 1 and "cannot reach the server" in gone.stderr
