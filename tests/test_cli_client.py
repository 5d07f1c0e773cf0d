"""dit-generate against a real server (API keys on), with 429 retries, and in local mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
from server_harness import ROOT, run_server, wait_until

from dit_client.cli import CliError, resolve_class

KEY = "cli-test-key"


def dit_generate(*args: str, key: str | None = KEY, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DIT_API_KEY"}
    if key is not None:
        env["DIT_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "dit_client", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("cli"), env={"DIT_API_KEYS": json.dumps([KEY])}) as s:
        yield s


def test_server_mode_by_name_and_local_mode_give_the_server_image(keyed, tmp_path):
    out = dit_generate("sneak", "--url", keyed.url, "--seed", "77", "--steps", "15", "--out", str(tmp_path / "a.png"))
    assert out.returncode == 0, out.stderr
    assert "Sneaker, seed 77" in out.stdout and "step" in out.stderr  # the progress bar
    with httpx.Client(base_url=keyed.url, headers={"X-API-Key": KEY}, timeout=60) as c:
        cfg = c.get("/info").json()["defaults"]["cfg_scale"]
        direct = c.post("/generate", json={"class_id": 7, "seed": 77, "steps": 15, "cfg_scale": cfg})
    assert (tmp_path / "a.png").read_bytes() == direct.content

    # What the README says: --out NAME.png --count N writes NAME-<seed>.png for each seed, no grid.
    many = dit_generate("7", "--url", keyed.url, "--seed", "1", "--steps", "5", "--count", "3",
                        "--out", str(tmp_path / "m.png"), "--quiet")
    assert many.returncode == 0, many.stderr
    assert sorted(p.name for p in tmp_path.glob("m*")) == ["m-1.png", "m-2.png", "m-3.png"]
    assert all((tmp_path / f"m-{s}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for s in (1, 2, 3))
    jpeg = dit_generate("7", "--url", keyed.url, "--steps", "5", "--out", str(tmp_path / "j.jpg"), "--quiet")
    assert jpeg.returncode == 0 and (tmp_path / "j.jpg").read_bytes()[:2] == b"\xff\xd8"  # the suffix's format
    folder = dit_generate("Bag", "--url", keyed.url, "--seed", "5", "--steps", "5", "--count", "2",
                          "--out", str(tmp_path / "bags") + "/", "--quiet")
    assert folder.returncode == 0 and sorted(p.name for p in (tmp_path / "bags").iterdir()) == [
        "Bag-5.png", "Bag-6.png"]

    local = dit_generate("Sneaker", "--local", "--seed", "77", "--steps", "15", "--out", str(tmp_path / "l.png"))
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "l.png").read_bytes() == direct.content  # same pipeline, same bytes


def test_guidance_interval_from_the_server_and_locally(keyed, tmp_path):
    args = ["Bag", "--seed", "3", "--steps", "10", "--cfg", "3", "--guidance-interval", "0.2", "0.6", "--quiet"]
    remote = dit_generate(*args, "--url", keyed.url, "--out", str(tmp_path / "r.png"))
    local = dit_generate(*args, "--local", "--out", str(tmp_path / "l.png"))
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    with httpx.Client(base_url=keyed.url, headers={"X-API-Key": KEY}, timeout=60) as c:
        direct = c.post("/generate", json={"class_id": 8, "seed": 3, "steps": 10, "cfg_scale": 3,
                                           "guidance_interval": [0.2, 0.6]})
    assert direct.headers["x-guidance-interval"] == "0.2,0.6"
    assert (tmp_path / "r.png").read_bytes() == direct.content == (tmp_path / "l.png").read_bytes()
    bad = dit_generate("Bag", "--url", keyed.url, "--guidance-interval", "0.6", "0.2")
    assert bad.returncode == 2 and "0 <= LO < HI <= 1" in bad.stderr


def test_errors_exit_non_zero_with_a_message(keyed, tmp_path):
    unknown = dit_generate("spaceship", "--url", keyed.url)
    assert unknown.returncode == 1 and "no class is named 'spaceship'" in unknown.stderr
    assert "0: T-shirt/top" in unknown.stderr and "9: Ankle boot" in unknown.stderr  # the valid ones
    ambiguous = dit_generate("s", "--url", keyed.url)
    assert ambiguous.returncode == 1 and "names 3 classes" in ambiguous.stderr and "type more" in ambiguous.stderr
    boot = dit_generate("boot", "--url", keyed.url)  # the server's rule: a prefix, not any part of a name
    assert boot.returncode == 1 and "no class is named 'boot'" in boot.stderr and "Ankle boot" in boot.stderr
    listed = dit_generate("--list-classes", "--url", keyed.url)
    assert listed.returncode == 0 and listed.stdout.splitlines()[7] == "7\tSneaker"
    no_key = dit_generate("0", "--url", keyed.url, key=None)
    assert no_key.returncode == 1 and "needs an API key" in no_key.stderr
    bad = dit_generate("0", "--url", keyed.url, "--steps", "5000")
    assert bad.returncode == 1 and "422" in bad.stderr and "steps" in bad.stderr
    gif = dit_generate("0", "--url", keyed.url, "--out", str(tmp_path / "x.gif"))
    assert gif.returncode == 1 and "'.gif'" in gif.stderr and not (tmp_path / "x.gif").exists()
    gone = dit_generate("0", "--url", "http://127.0.0.1:9")
    assert gone.returncode == 1 and "cannot reach the server" in gone.stderr


def test_an_unknown_name_among_many_classes_lists_the_nearest():
    names = [f"class {i}" for i in range(990)] + ["tabby cat", "tiger cat", "Persian cat", "Siamese cat",
                                                   "Egyptian cat", "tabby", "tiger", "lion", "cheetah", "jaguar"]
    with pytest.raises(CliError) as e:
        resolve_class("tigr", names)
    assert "996: tiger" in str(e.value) and "--list-classes shows all 1000" in str(e.value)
    assert "class 3" not in str(e.value)  # not all 1000


@pytest.mark.slow
def test_retries_429_after_retry_after(tmp_path):
    # Two 1000-step jobs fill the one-row batch and the one-place queue until the test cancels them,
    # once the client has been refused: no race with how fast the machine steps.
    with run_server(tmp_path, "--max-queue", "1", "--max-batch-rows", "1", "--max-steps", "1000") as s:
        long = {"class_id": 1, "steps": 1000, "cfg_scale": 1.0, "sampler": "ddim", "cache": "off"}
        running = httpx.post(s.url + "/jobs", json=dict(long, seed=0)).json()
        wait_until(lambda: s.metric("dit_active_samples") == 1, 20, "the first job to run")
        waiting = httpx.post(s.url + "/jobs", json=dict(long, seed=1)).json()
        wait_until(lambda: s.metric("dit_queue_depth") == 1, 20, "the queue to fill")
        client = subprocess.Popen([sys.executable, "-m", "dit_client", "Trouser", "--url", s.url, "--steps", "5",
                                   "--out", str(tmp_path / "t.png"), "--retries", "100", "--retry-wait-max", "0.2"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stderr: list[str] = []
        reader = threading.Thread(target=lambda: stderr.extend(client.stderr), daemon=True)
        reader.start()
        try:
            wait_until(lambda: any("server busy (429); retrying in 0.2 s" in line for line in stderr), 60,
                       "the client to be refused and to wait at most --retry-wait-max")
            for job in (waiting, running):
                assert httpx.delete(s.url + job["status_url"]).status_code == 200
            assert client.wait(120) == 0, "".join(stderr)
        finally:
            client.kill()
        reader.join(10)
        assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
