"""What the job store sustains, against what the engine can produce: jobs per second through the store
alone (each job = 1 submit, 5 status polls, its end written with a 16-image PNG grid, 1 result fetch;
64 concurrent clients, no engine: the store is all that is timed), for SQLite and, with --postgres URL,
PostgreSQL; and the time from start to ready of the real server with 1,000 jobs in its store vs none.

    python bench/job_store.py [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

The engine's own job rate for comparison: the embedded model's images/s from bench/serve_load.py
(continuous, 32 clients) divided by the images per job (1 here).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from model.samplers import Sampling  # noqa: E402
from server.engine.request import EngineRequest  # noqa: E402
from server.service.job import Job  # noqa: E402
from server.service.job_store import JobStore, store_url  # noqa: E402

CLIENTS = 64
POLLS = 5


def grid_png() -> bytes:
    """A 16-image grid of the embedded model (4 x 4 cells of 28 px), as PNG: noise, so it compresses as
    badly as real images do."""
    pixels = np.random.default_rng(0).integers(0, 256, (4 * 30 + 2, 4 * 30 + 2, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def new_job(k: int) -> Job:
    now = time.time()
    request = EngineRequest(f"bench-{k}-{now}", k % 10, tuple(range(16)), Sampling("ddim", 10, 1.0), now, now + 3600)
    return Job(request, "fashion_dit", "T-shirt/top")


def one_job(store: JobStore, k: int, image: bytes) -> None:
    job = new_job(k)
    store.add(job)
    for _ in range(POLLS):
        store.get(job.id, None)
    job.finish([image])  # the store writes the end (status, images) as the engine's end would
    store.images(store.get(job.id, None))


def jobs_per_second(url: str, seconds: float) -> float:
    store = JobStore(url, ttl=3600, max_jobs=10**9)
    image, done, end = grid_png(), 0, time.monotonic() + seconds
    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        def client(c: int) -> int:
            n = 0
            while time.monotonic() < end:
                one_job(store, c * 10**6 + n, image)
                n += 1
            return n
        t0 = time.monotonic()
        done = sum(pool.map(client, range(CLIENTS)))
        wall = time.monotonic() - t0
    store.close()
    return done / wall


def start_to_ready(data_dir: Path) -> float:
    from server_harness import run_server

    t0 = time.monotonic()
    with run_server(data_dir, "--data-dir", str(data_dir)):
        return time.monotonic() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--postgres", help="a PostgreSQL URL to measure too")
    p.add_argument("--seconds", type=float, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"SQLite": store_url(None, Path(tmp) / "rate")}
        if args.postgres:
            stores["PostgreSQL"] = args.postgres
        for name, url in stores.items():
            print(f"{name}: {jobs_per_second(url, args.seconds):.0f} jobs/s through the store "
                  f"({CLIENTS} clients; 1 submit + {POLLS} polls + end with a 16-image grid + 1 result fetch)")
        empty, full = Path(tmp) / "empty", Path(tmp) / "full"
        store = JobStore(store_url(None, full), ttl=3600, max_jobs=10**9)
        image = grid_png()
        for k in range(1000):
            job = new_job(k)
            store.add(job)
            job.finish([image])
        store.close()
        empty.mkdir()
        ready = [start_to_ready(empty), start_to_ready(full)]
        print(f"start to ready: {ready[0]:.2f} s with an empty store, {ready[1]:.2f} s with 1,000 jobs "
              f"({ready[1] - ready[0]:+.2f} s)")


if __name__ == "__main__":
    main()
