"""The server's images/s at saturation with and without a step cache, in one run.

    python bench/cache_throughput.py [--cache taylor2] [--clients 64] [--seconds 30] [--rounds 2]
    python bench/cache_throughput.py --cache features3g2 --request '{"steps": 13, "cfg_scale": 4.25}'

Two servers of the real CLI, one after the other on this machine: the uncached one (`--cache off`) and the
same server with `--cache PRESET` (every request that names no cache gets it; `default`: the model's
declared default, no flag), alternated (uncached, cached, uncached, cached for --rounds 2), so that a slow
spell of a shared machine hits both. Against each, 64 closed-loop clients each send one default request (one
image, the model's declared settings) after the other; `--request` adds fields to the cached server's
requests (a setting whose cache is tuned to other steps or scale), `--baseline` to the uncached one's. Per
run: images/s over the measured window (after a warm-up), forward rows per image from
dit_forward_rows_computed_total (the rows computed, not planned), the mean samples per forward, and where
the machine's CPU went in the window (cores busy on average: the engine process, the front-end process,
these clients, and everything else on the machine).

Why the CPU split: client, front-end and engine share this machine's cores. A cached engine needs fewer
rows per image, so at the same images/s it leaves more of the 64 requests outside the engine (in the
clients, the HTTP layer, encoding, and the per-step progress outputs, of which a faster engine sends more
per second). When other work takes a core, the front-end and clients fall behind first and the engine runs
narrow steps: "samples per forward" falls far below the budget's (32 guided samples uncached) and the run
measures the front-end, not the cache. The split says which run that was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import free_port, wait_until  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def machine_busy() -> float:
    """CPU seconds every core of the machine has been busy so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


def cpu_split(server: int) -> dict[str, float]:
    """CPU seconds so far: the engine process(es) under the server, the server (front-end), this client, all."""
    engine = sum(process_cpu(c) for c in children(server))
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"engine": engine, "frontend": process_cpu(server), "clients": me.ru_utime + me.ru_stime,
            "machine": machine_busy()}


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def client(url: str, k: int, end: float, out: list, extra: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        n = 0
        while time.monotonic() < end:
            r = await c.post("/generate", json={"class_id": k % 10, "seed": 1000 * k + n, **extra})
            out.append(r.status_code)
            n += 1


async def drive(url: str, clients: int, seconds: float, extra: dict) -> list[int]:
    out: list[int] = []
    end = time.monotonic() + seconds
    await asyncio.gather(*(client(url, k, end, out, extra) for k in range(clients)))
    return out


def run_server(cache: str, args) -> dict:
    """One server: cache "off" (the uncached one, its requests with --baseline's fields) or the cached one."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tempfile.mkdtemp(prefix="dit-bench-")  # a job store of its own, never the user's
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning", "--max-batch-rows",
           str(args.max_batch_rows), "--max-queue", "1000", "--request-timeout", "600", "--data-dir", data_dir]
    if cache != "default":
        cmd += ["--cache", cache]
    extra = json.loads(args.baseline if cache == "off" else args.request)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        def ready():
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "the server")
        asyncio.run(drive(url, args.clients, args.warmup, extra))
        before, cpu0, t0 = scrape(url), cpu_split(proc.pid), time.monotonic()
        codes = asyncio.run(drive(url, args.clients, args.seconds, extra))
        wall, after, cpu1 = time.monotonic() - t0, scrape(url), cpu_split(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    ok = sum(c == 200 for c in codes)
    images = d.get("dit_images_generated_total", 0) or ok
    cores = {k: (cpu1[k] - cpu0[k]) / wall for k in cpu0}  # mean cores busy in the window
    cores["other"] = max(0.0, cores.pop("machine") - cores["engine"] - cores["frontend"] - cores["clients"])
    return {"cache": cache, "images_per_s": ok / wall, "errors": len(codes) - ok,
            "rows_per_image": d["dit_forward_rows_computed_total"] / max(1, images),
            "samples_per_forward": d["dit_batch_size_sum"] / max(1, d["dit_batch_size_count"]),
            "cores": {k: round(v, 2) for k, v in cores.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="taylor2", help="the cached server's --cache (a preset, a JSON object, "
                   "or 'default': the model's declared default)")
    p.add_argument("--request", default="{}", help="JSON fields every request to the cached server carries, "
                   "e.g. '{\"steps\": 13, \"cfg_scale\": 4.25}'")
    p.add_argument("--baseline", default="{}", help="JSON fields every request to the uncached server carries")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch-rows", type=int, default=64)
    p.add_argument("--threads", type=int, help="the servers' torch threads (default: torch's choice)")
    args = p.parse_args()
    runs = []
    for _ in range(args.rounds):
        for cache in ("off", args.cache):
            runs.append(run_server(cache, args))
            print(runs[-1], flush=True)
    print(f"\n{args.clients} closed-loop clients, one default image each, {args.seconds:g} s measured per run, "
          f"uncached (requests + {args.baseline}) and cached (+ {args.request}) alternated x {args.rounds}")
    print("| server | images/s (each run) | median | forward rows per image | samples per forward (each run) | "
          "cores busy: engine / front-end / clients / other (each run) | errors |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for name in ("off", args.cache):
        rs = [r for r in runs if r["cache"] == name]
        medians[name] = statistics.median(r["images_per_s"] for r in rs)
        print(f"| {'uncached' if name == 'off' else '--cache ' + name} | "
              f"{', '.join(format(r['images_per_s'], '.1f') for r in rs)} | {medians[name]:.1f} | "
              f"{statistics.mean(r['rows_per_image'] for r in rs):.1f} | "
              f"{', '.join(format(r['samples_per_forward'], '.1f') for r in rs)} | "
              f"{'; '.join('/'.join(format(v, '.2f') for v in r['cores'].values()) for r in rs)} | "
              f"{sum(r['errors'] for r in rs)} |")
    print(f"\ncached / uncached images/s: {medians[args.cache] / medians['off']:.2f}x")


if __name__ == "__main__":
    main()
