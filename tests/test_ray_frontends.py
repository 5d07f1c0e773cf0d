"""Two front-ends on one PostgreSQL job store (server/ray_app.py, frontend_replicas=2), on a real two-node
Ray cluster on loopback and a real PostgreSQL server: Serve's proxy spreads the requests over both, so a
job made through one is polled, fetched and cancelled through either; both see the fleet (readiness,
/metrics); and kill -9 of one front-end loses no job: the other claims its jobs once their leases run
out, and each ends done with the images of the same request run alone (within one grey level)."""

from __future__ import annotations

import io
import os
import re
import signal
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from ray_harness import deploy, ray_cluster
from server_harness import wait_until

pytest.importorskip("ray.serve", reason="Ray is not installed: make test installs it (pip install -e '.[ray]')")
pytest.importorskip("psycopg", reason="psycopg is not installed: make test installs it (.[postgres])")

FLEET = {"threads": 1, "max_batch_rows": 8, "request_timeout": 60, "job_timeout": 600, "log_format": "text",
         "min_replicas": 1, "max_replicas": 1, "deadline_admission": False, "frontend_replicas": 2}
JOBS = 6


def body(k: int) -> dict:  # 8 rows: two jobs at a time, the others queue behind them
    return {"class_id": k % 10, "steps": 120, "num_images": 4, "seed": 500 + k, "sampler": "ddim", "cfg_scale": 1.0}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def get(url: str, path: str) -> httpx.Response | None:
    """Through the proxy, to whichever front-end; None while the one it picked is being replaced."""
    try:
        r = httpx.get(url + path, timeout=30)
    except httpx.TransportError:
        return None
    return r if r.status_code < 500 else None


def frontend_pids(count: int = 2, timeout: float = 60) -> set[int]:
    from ray import serve

    handle = serve.get_deployment_handle("Frontend", app_name="dit")
    found: set[int] = set()
    end = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < end:
        found.add(handle.process.remote().result(timeout_s=30))
    assert len(found) == count, found
    return found


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from postgres_harness import postgres_server

    tmp = tmp_path_factory.mktemp("rayfe")  # short: Ray's socket paths must fit 107 bytes
    with postgres_server() as pg, ray_cluster(tmp) as url:
        deploy(url, dict(FLEET, job_store=pg.url))
        yield url, pg


def holders(pg) -> dict[int, int]:
    """{front-end pid: pending jobs it holds}, from the store (a holder is host:pid:nonce)."""
    from sqlalchemy import create_engine, text

    db = create_engine(pg.url)
    with db.connect() as c:
        rows = c.execute(text("SELECT holder, count(*) FROM dit_jobs WHERE status = 'pending' AND holder IS NOT "
                              "NULL GROUP BY holder")).all()
    db.dispose()
    return {int(holder.split(":")[1]): n for holder, n in rows}


@pytest.mark.slow
def test_two_front_ends_share_jobs_and_a_killed_one_loses_none(fleet):
    fleet, pg = fleet
    pids = frontend_pids()
    ids = [httpx.post(fleet + "/jobs", json=body(k), timeout=30).json()["id"] for k in range(JOBS)]
    extra = httpx.post(fleet + "/jobs", json=body(JOBS), timeout=30).json()["id"]
    # Every job is visible through either front-end (20 polls each land on both with near certainty).
    for job in ids:
        assert all(get(fleet, f"/jobs/{job}").status_code == 200 for _ in range(4))
    # Cancelled through whichever front-end the DELETE lands on (its holder reads the flag).
    assert httpx.delete(f"{fleet}/jobs/{extra}", timeout=30).status_code == 200
    wait_until(lambda: (r := get(fleet, f"/jobs/{extra}")) is not None and r.json()["status"] == "cancelled", 30,
               "the cancel to reach the job's front-end")
    # Both front-ends see the engine replica (through the store): ready, and counted in /metrics.
    for _ in range(10):  # and each answers /metrics for both front-ends, whichever a scrape reaches
        assert get(fleet, "/readyz").status_code == 200
        text = get(fleet, "/metrics").text
        assert "dit_fleet_replicas 1.0" in text
        assert len(set(re.findall(r'^dit_ready\{frontend="([^"]+)"\} 1\.0$', text, re.M))) == 2, text[:2000]

    held = holders(pg)
    assert set(held) <= pids, (held, pids)
    victim = max(pids, key=lambda pid: held.get(pid, 0))
    assert held.get(victim, 0) >= 1, held  # it holds jobs that must be taken over
    os.kill(victim, signal.SIGKILL)  # the jobs it held are held by no one once their leases run out
    killed_at = time.monotonic()

    def ended() -> list[str]:
        answers = [get(fleet, f"/jobs/{job}") for job in ids]
        return [a.json()["status"] for a in answers] if all(answers) else []

    wait_until(lambda: ended() == ["done"] * JOBS, 400, "every job to end done", interval=1.0)
    print(f"\nevery job done {time.monotonic() - killed_at:.0f} s after kill -9 of a front-end")
    for k, job in enumerate(ids):
        result = httpx.get(f"{fleet}/jobs/{job}/result", timeout=60)
        alone = httpx.post(fleet + "/generate", json=body(k), timeout=120)
        assert result.status_code == alone.status_code == 200, (result.text, alone.text)
        assert np.abs(pixels(result.content) - pixels(alone.content)).max() <= 1, job
    wait_until(lambda: len(frontend_pids()) == 2 and victim not in frontend_pids(), 120,
               "Serve to replace the killed front-end")
