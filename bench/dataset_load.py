"""A dataset beside interactive traffic, on the real server (embedded model, default settings, loopback):

    python bench/dataset_load.py [--images 640] [--probes 200] [--json out.json]

In one run, on one server:
  idle        single-image /generate requests one after another: their latency (p50, p99);
  saturated   4 closed-loop clients of 16-image requests for 20 s (64 images asked for at once, more than
              the 64-row budget holds): the engine's images/s with every row busy;
  dataset     a dataset alone (`--images` images, default settings): its images/s, as a share of the
              saturated rate (target >= 90%);
  beside      the same single-image requests while a dataset runs: their p99 against the idle p99
              (target <= 1.5x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import run_server, wait_until  # noqa: E402

ONE = {"class_id": 3}


def latencies(url: str, count: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for k in range(count):
            t0 = time.monotonic()
            r = c.post("/generate", json=dict(ONE, seed=k))
            assert r.status_code == 200, r.text
            out.append(time.monotonic() - t0)
    return out


def p(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank: of 100 values, p99 is the 99th smallest (not the largest)."""
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


async def saturated(url: str, clients: int = 4, seconds: float = 20.0) -> float:
    """The engine's images/s with every row busy: closed-loop clients of 16-image requests at the dataset's
    settings (the defaults), each honouring Retry-After on a 429."""
    done = 0
    end = time.monotonic() + seconds

    async def client(k: int):
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            while time.monotonic() < end:
                r = await c.post("/generate", json=dict(ONE, seed=1000 * k, num_images=16))
                if r.status_code == 200 and time.monotonic() < end:
                    done += 16
                elif r.status_code == 429:
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))

    t0 = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return done / (time.monotonic() - t0)


def dataset_rate(url: str, images: int) -> tuple[str, float]:
    per_class = images // 10
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/datasets", json={"classes": "all", "per_class": per_class, "shard_size": 64, "seed": 1})
        r.raise_for_status()
        dataset_id = r.json()["id"]
        t0 = time.monotonic()
        wait_until(lambda: c.get(f"/datasets/{dataset_id}").json()["status"] != "running", 1800, "the dataset",
                   interval=0.2)
        return dataset_id, per_class * 10 / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp)) as s:
        latencies(s.url, 5)  # warm
        idle = latencies(s.url, args.probes)
        report["idle_s"] = {"p50": round(p(idle, 0.5), 4), "p99": round(p(idle, 0.99), 4)}
        report["saturated_images_per_s"] = round(asyncio.run(saturated(s.url)), 2)
        _, rate = dataset_rate(s.url, args.images)
        report["dataset_images_per_s"] = round(rate, 2)
        report["dataset_share_of_saturated"] = round(rate / report["saturated_images_per_s"], 3)
        with httpx.Client(base_url=s.url, timeout=60) as c:
            big = c.post("/datasets", json={"classes": "all", "per_class": 1000, "shard_size": 500, "seed": 2}).json()
            time.sleep(2)  # the dataset fills the batch
            beside = latencies(s.url, args.probes)
            status = c.get(f"/datasets/{big['id']}").json()
            c.delete(f"/datasets/{big['id']}")
        report["beside_dataset_s"] = {"p50": round(p(beside, 0.5), 4), "p99": round(p(beside, 0.99), 4),
                                      "dataset_images_per_s_meanwhile": status["images_per_second"]}
        report["p99_ratio"] = round(report["beside_dataset_s"]["p99"] / report["idle_s"]["p99"], 2)
        report["p50_ratio"] = round(statistics.median(beside) / statistics.median(idle), 2)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
