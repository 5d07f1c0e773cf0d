"""Overload: the real server (embedded model, small limits) driven at >= 10x its capacity, twice.

    python bench/overload.py [--seconds 60] [--factor 10] [--json out.json]

A warm-up measures the capacity (requests/s with the queue kept busy); then each run sends requests
open-loop at `factor` x that rate for `seconds`, from this process, to loopback only, and stops by
itself. Every request must end in 200, 429 (with Retry-After) or 504 within the client's timeout;
sent = answered; images received = dit_images_generated_total; the server's resident memory after the
second run within 10% of after the first; and a normal request is served afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import run_server  # noqa: E402

BODY = {"class_id": 3, "steps": 10, "num_images": 2}
SERVER_ARGS = ("--max-steps", "10", "--max-images", "2", "--max-queue", "32", "--max-batch-rows", "32",
               "--request-timeout", "5", "--log-level", "warning")
CLIENT_TIMEOUT = 30.0  # a request unanswered after this long counts as hung


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def images_total(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("dit_images_generated_total "):
            return float(line.split()[1])
    return 0.0


async def capacity(url: str, seconds: float = 5.0) -> float:
    done, end = 0, time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT) as c:
        async def worker():
            nonlocal done
            while time.monotonic() < end:
                if (await c.post("/generate", json=BODY)).status_code == 200:
                    done += 1
        await asyncio.gather(*(worker() for _ in range(16)))
    return done / seconds


async def flood(url: str, rate: float, seconds: float) -> dict:
    results: list[tuple[int | str, float, bool]] = []
    # Idle connections expire on our side (2 s) before uvicorn closes them (5 s): otherwise a request can
    # race the server's close of a kept-alive connection and fail with a reset that no server could avoid.
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT, limits=limits) as c:
        async def one():
            t0 = time.monotonic()
            try:
                r = await c.post("/generate", json=BODY)
                results.append((r.status_code, time.monotonic() - t0,
                                r.status_code != 429 or "retry-after" in r.headers))
            except httpx.TimeoutException:
                results.append(("hung", time.monotonic() - t0, False))
            except httpx.TransportError as e:
                results.append((f"transport:{type(e).__name__}", time.monotonic() - t0, False))

        tasks, start = [], time.monotonic()
        n = int(rate * seconds)
        for k in range(n):  # open loop: arrivals on a fixed schedule, whatever the answers
            await asyncio.sleep(max(0.0, start + k / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    codes: dict[str, int] = {}
    for code, _, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    ok = sorted(t for code, t, _ in results if code == 200)
    every = sorted(t for _, t, _ in results)
    return {"sent": n, "answered": len(results), "codes": codes,
            "retry_after_missing": sum(1 for _, _, fine in results if not fine),
            "p50_ok_s": ok[len(ok) // 2] if ok else None, "p99_ok_s": ok[int(0.99 * (len(ok) - 1))] if ok else None,
            "p50_all_s": every[len(every) // 2], "p99_all_s": every[int(0.99 * (len(every) - 1))]}


def run(seconds: float, factor: float, workdir: Path) -> dict:
    with run_server(workdir, *SERVER_ARGS) as server:
        cap = asyncio.run(capacity(server.url))
        report = {"capacity_req_s": cap, "rate_req_s": cap * factor, "seconds": seconds, "runs": []}
        for _ in range(2):
            images_before = images_total(server.url)
            run_report = asyncio.run(flood(server.url, cap * factor, seconds))
            time.sleep(1.0)
            run_report["images_received"] = 2 * run_report["codes"].get("200", 0)
            run_report["images_counted"] = images_total(server.url) - images_before
            run_report["rss_mib"] = rss_bytes(server.proc.pid) / 2**20
            report["runs"].append(run_report)
        after = httpx.post(server.url + "/generate", json=BODY, timeout=CLIENT_TIMEOUT)
        report["after_status"] = after.status_code
    first, second = report["runs"]
    report["rss_growth"] = second["rss_mib"] / first["rss_mib"] - 1
    problems = []
    for k, r in enumerate(report["runs"], 1):
        other = {c: v for c, v in r["codes"].items() if c not in ("200", "429", "504")}
        if other:
            problems.append(f"run {k}: answers other than 200/429/504: {other}")
        if r["sent"] != r["answered"]:
            problems.append(f"run {k}: sent {r['sent']} but {r['answered']} answered")
        if r["images_received"] != r["images_counted"]:
            problems.append(f"run {k}: {r['images_received']} images received, {r['images_counted']} counted")
        if r["retry_after_missing"]:
            problems.append(f"run {k}: {r['retry_after_missing']} answers of 429 without Retry-After")
    if abs(report["rss_growth"]) > 0.10:
        problems.append(f"resident memory changed {report['rss_growth']:.1%} between the runs")
    if report["after_status"] != 200:
        problems.append(f"the request after the load answered {report['after_status']}")
    report["problems"] = problems
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--factor", type=float, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import tempfile

    report = run(args.seconds, args.factor, Path(tempfile.mkdtemp()))
    print(f"capacity {report['capacity_req_s']:.1f} req/s; load {report['rate_req_s']:.0f} req/s for "
          f"{args.seconds:g} s, twice")
    for k, r in enumerate(report["runs"], 1):
        print(f"run {k}: sent {r['sent']}, answered {r['answered']}, {r['codes']}, p50/p99 of 200s "
              f"{r['p50_ok_s']:.2f}/{r['p99_ok_s']:.2f} s, p50/p99 of all {r['p50_all_s']:.2f}/{r['p99_all_s']:.2f} s, "
              f"images {r['images_received']} received = {r['images_counted']:.0f} counted, RSS {r['rss_mib']:.0f} MiB")
    print(f"RSS change between runs {report['rss_growth']:+.1%}; request afterwards: {report['after_status']}")
    print("problems: " + ("; ".join(report["problems"]) or "none"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
