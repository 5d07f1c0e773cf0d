"""Batching policies under load: the real server in its own process, N concurrent clients in this one.

    python bench/serve_load.py [--clients 32] [--seconds 20] [--policies continuous request none]

Each client sends requests back to back (half 10 steps, half 50, the model's default sampler and
guidance). Prints, per policy: images/s, p50/p99 latency of the short and the long requests, mean
forward batch, and the share of server wall time spent outside the model (HTTP, queue, encode):
1 - (step + decode seconds) / wall seconds over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import free_port, wait_until  # noqa: E402


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def client(url: str, k: int, end: float, out: list) -> None:
    steps = 10 if k % 2 == 0 else 50
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        while time.monotonic() < end:
            t0 = time.monotonic()
            r = await c.post("/generate", json={"class_id": k % 10, "steps": steps, "seed": k})
            out.append((steps, r.status_code, time.monotonic() - t0))


async def drive(url: str, clients: int, seconds: float) -> list:
    out: list = []
    end = time.monotonic() + seconds
    await asyncio.gather(*(client(url, k, end, out) for k in range(clients)))
    return out


def run_policy(policy: str, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--policy", policy, "--log-level", "warning",
           "--max-batch-rows", str(args.max_batch_rows), "--max-queue", "1000", "--request-timeout", "600"]
    if args.model:
        cmd += ["--model", args.model]
    data = tempfile.TemporaryDirectory()  # its own job store: not the user's, nor another checkout's
    cmd += ["--data-dir", data.name]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        def ready():
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "the server")
        asyncio.run(drive(url, args.clients, 3))  # warm the batch shapes
        before, t0 = scrape(url), time.monotonic()
        results = asyncio.run(drive(url, args.clients, args.seconds))
        wall, after = time.monotonic() - t0, scrape(url)
    finally:
        proc.terminate()
        proc.wait(60)
        data.cleanup()
    ok = [r for r in results if r[1] == 200]
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    model_s = d["dit_step_duration_seconds_sum"] + d["dit_decode_duration_seconds_sum"]
    return {
        "policy": policy, "images_per_s": len(ok) / wall, "errors": len(results) - len(ok),
        **{f"{kind}_{name}": pct([r[2] for r in ok if r[0] == steps], q)
           for kind, steps in (("short", 10), ("long", 50)) for name, q in (("p50", 0.5), ("p99", 0.99))},
        "batch": d["dit_batch_size_sum"] / max(1, d["dit_batch_size_count"]),
        "outside": 1 - model_s / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--max-batch-rows", type=int, default=64)
    p.add_argument("--model", default=None, help="default: the server's (the embedded model)")
    p.add_argument("--policies", nargs="+", default=["continuous", "request", "none"])
    args = p.parse_args()
    rows = [run_policy(policy, args) for policy in args.policies]
    print(f"\n{args.clients} clients, {args.seconds:g} s each, half 10-step and half 50-step requests")
    print(f"{'policy':>10} {'img/s':>7} {'short p50':>9} {'short p99':>9} {'long p50':>8} {'long p99':>8} "
          f"{'batch':>5} {'outside model':>13} {'errors':>6}")
    for r in rows:
        print(f"{r['policy']:>10} {r['images_per_s']:>7.1f} {r['short_p50']:>9.2f} {r['short_p99']:>9.2f} "
              f"{r['long_p50']:>8.2f} {r['long_p99']:>8.2f} {r['batch']:>5.1f} {r['outside']:>13.1%} {r['errors']:>6}")
    by = {r["policy"]: r for r in rows}
    if "continuous" in by and "none" in by:
        print(f"continuous / none throughput: {by['continuous']['images_per_s'] / by['none']['images_per_s']:.1f}x")
    if "continuous" in by and "request" in by:
        print(f"short-request p99, continuous vs request-level: {by['continuous']['short_p99']:.2f} s vs "
              f"{by['request']['short_p99']:.2f} s")


if __name__ == "__main__":
    main()
