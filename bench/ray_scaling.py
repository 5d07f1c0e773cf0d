"""Throughput of 1 vs 2 engine replicas on Ray Serve, measured in one run on this machine.

A two-node Ray cluster on loopback (one CPU per node, tests/ray_harness.py); the embedded model with
one torch thread per replica; closed-loop clients posting the same request for a fixed time, first
against one replica, then against two (a redeploy). Prints images/s for each and the ratio.

    .venv/bin/python bench/ray_scaling.py [--seconds 30] [--clients 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ray_harness import deploy, ray_cluster, replica_states  # noqa: E402

BODY = {"class_id": 4, "steps": 25, "num_images": 2, "sampler": "ddim"}


def measure(url: str, clients: int, seconds: float) -> tuple[float, dict[str, int]]:
    """Images per second over `seconds` of closed-loop load (after a 3 s ramp), and who served them."""
    counts: dict[str, int] = {}
    start, stop = time.monotonic() + 3, time.monotonic() + 3 + seconds
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                r = c.post("/generate", json=BODY)
                done = time.monotonic()
                if r.status_code == 200 and start <= done < stop:
                    with lock:
                        replica = r.headers["x-replica"]
                        counts[replica] = counts.get(replica, 0) + BODY["num_images"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts.values()) / seconds, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    common = {"threads": 1, "max_batch_rows": 32, "log_format": "text", "log_level": "warning"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp, ray_cluster(Path(tmp)) as url:
        for n in (1, 2):
            deploy(url, {**common, "min_replicas": n, "max_replicas": n})
            while replica_states().get("RUNNING") != n or sum(replica_states().values()) != n:
                time.sleep(0.5)  # the redeploy from 1 to 2 is done when exactly n run
            results[n] = measure(url, args.clients, args.seconds)
            print(f"{n} replica(s): {results[n][0]:.1f} images/s  by replica: {results[n][1]}", flush=True)
    print(f"\n2 replicas / 1 replica: {results[2][0] / results[1][0]:.2f}x "
          f"({args.clients} closed-loop clients, {args.seconds:.0f} s each, {BODY})")


if __name__ == "__main__":
    main()
