"""Overload: the real server (embedded model, small limits) driven far past its capacity.

    python bench/overload.py [--engines thread,process] [--seconds 60] [--storm-seconds 30] [--json out.json]

For each engine mode (`--engine thread`, the engine on a thread of the HTTP process, is the reference;
`--engine process` is the default), in one run, loopback only, bounded in time:
  capacity  16 closed-loop clients for 8 s, before the loads and again after them: requests/s served
            (the reference is the higher of the two);
  (a) flood open-loop arrivals at `factor` x capacity for `seconds` (from this process);
  (b) storm 256 closed-loop connections (wrk) that resend at once on 429, for `storm-seconds`.
Goodput = answers of 200 per second during the load, as a share of the capacity. Also: requests
admitted and then ended by 504 as a share of those admitted (server counters); the books (every request
sent is answered, or was in flight when the load stopped; images received = images counted); resident
memory after (b) within 10% of after (a); the CPU share of the front-end, the engine and the load
generator during each load; and a normal request served afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import free_port, run_server  # noqa: E402

BODY = {"class_id": 3, "steps": 10, "num_images": 2}
SERVER_ARGS = ("--max-steps", "10", "--max-images", "2", "--max-queue", "32", "--max-batch-rows", "32",
               "--request-timeout", "5", "--log-level", "warning")
CLIENT_TIMEOUT = 30.0  # a request unanswered after this long counts as hung
STORM_CONNECTIONS = 256
# wrk's Lua: POST the body on every connection, count the answers by status, print them at the end.
STORM_LUA = """
wrk.method = "POST"
wrk.body = 'BODY'
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts")) do io.write(string.format("status %d %d\\n", status, n)) end
  end
  io.write(string.format("errors connect %d read %d write %d timeout %d status %d\\n", summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout, summary.errors.status))
end
""".replace("BODY", json.dumps(BODY))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@contextlib.contextmanager
def cpu_shares(pids: list[int]):
    """CPU time per wall second while the block runs: the server's processes (front-end, engine), then
    the load generator (this process, or wrk as its child). Filled in when the block ends."""
    shares: list[float] = []
    cpu0, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
    client0 = time.process_time() + _children_cpu()
    yield shares
    wall = time.monotonic() - t0
    shares += [(cpu_seconds(p) - c) / wall for p, c in zip(pids, cpu0, strict=True)]
    shares.append((time.process_time() + _children_cpu() - client0) / wall)


@contextlib.contextmanager
def probing(url: str, every: float = 0.5):
    """GET /readyz every `every` s while the block runs, as an orchestrator's health check would: the
    seconds each answer took (a probe that fails or takes 30 s counts as 30). Filled in when the block ends."""
    seconds: list[float] = []
    stop = threading.Event()

    def probe():
        with httpx.Client(timeout=30) as c:
            while not stop.wait(every):
                t0 = time.monotonic()
                try:
                    ok = c.get(url + "/readyz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                seconds.append(time.monotonic() - t0 if ok else 30.0)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield seconds
    finally:
        stop.set()
        thread.join()


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def engine_pid(server_pid: int) -> int:
    """The engine process: the server's child that runs multiprocessing's spawn (not its resource tracker)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(stat.parent.name)
    raise RuntimeError(f"no engine process under {server_pid}")


def counters(url: str) -> dict[str, float]:
    """The server's request books (answers by code, admitted, finished by reason, images) and the engine's
    step times."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r'(dit_requests_total\{code="\d+"\}|dit_requests_admitted_total|'
                     r'dit_requests_finished_total\{reason="\w+"\}|dit_images_generated_total|'
                     r'dit_step_duration_seconds_(?:sum|count)) (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def step_ms(server_counts: dict) -> float:
    """The engine's mean step time over a phase, in ms: the step loop should not slow down under load."""
    steps = server_counts.get("dit_step_duration_seconds_count", 0)
    return 1000 * server_counts.get("dit_step_duration_seconds_sum", 0) / steps if steps else float("nan")


def delta(after: dict, before: dict) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


async def capacity(url: str, seconds: float = 8.0) -> float:
    done, end = 0, time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT) as c:
        async def worker():
            nonlocal done
            while time.monotonic() < end:
                if (await c.post("/generate", json=BODY)).status_code == 200:
                    done += 1
        await asyncio.gather(*(worker() for _ in range(16)))
    return done / seconds


class _Connection:
    """One kept-alive HTTP/1.1 connection of the flood's client: pre-encoded request, minimal parsing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.idle_since = reader, writer, time.monotonic()

    async def post(self, request: bytes) -> tuple[int, bool, bool]:
        """(status, has Retry-After, server keeps the connection open)."""
        self.writer.write(request)
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length, retry_after, keep = 0, False, True
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"retry-after":
                retry_after = True
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
            elif name == b"transfer-encoding":
                raise ValueError("a chunked answer: this client reads Content-Length bodies only")
        await self.reader.readexactly(length)
        return status, retry_after, keep

    def close(self) -> None:
        self.writer.close()


async def flood(url: str, rate: float, seconds: float) -> dict:
    """Open loop: arrivals on a fixed schedule, whatever the answers; waits for every answer.

    The client is raw asyncio streams with the request encoded once, not httpx: on a 2-core machine an
    httpx client sending ~150 requests/s takes ~70% of a core from the server it measures (wrk, the
    storm's client, takes ~7%)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(BODY).encode()
    request = (f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    idle: list[_Connection] = []
    results: list[tuple[int | str, bool]] = []
    served_seconds: list[float] = []  # the latency of each 200

    async def one():
        conn, sent = None, time.monotonic()
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                # Idle connections expire on our side (2 s) before uvicorn closes them (5 s): otherwise a
                # request can race the server's close of a kept-alive connection and fail with a reset
                # that no server could avoid.
                while idle and time.monotonic() - idle[-1].idle_since > 2.0:
                    idle.pop().close()
                conn = idle.pop() if idle else _Connection(*await asyncio.open_connection(host, int(port)))
                status, retry_after, keep = await conn.post(request)
            results.append((status, status != 429 or retry_after))
            if status == 200:
                served_seconds.append(time.monotonic() - sent)
            if keep:
                conn.idle_since = time.monotonic()
                idle.append(conn)
                conn = None
        except TimeoutError:
            results.append(("hung", False))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            results.append((f"transport:{type(e).__name__}", False))
        finally:
            if conn is not None:
                conn.close()

    tasks, start = [], time.monotonic()
    n = int(rate * seconds)
    for k in range(n):
        await asyncio.sleep(max(0.0, start + k / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    served_seconds.sort()
    return {"sent": n, "answered": len(results), "codes": codes,
            "retry_after_missing": sum(1 for _, fine in results if not fine),
            "latency_200_s": {q: served_seconds[int(q * (len(served_seconds) - 1))] if served_seconds else None
                              for q in (0.5, 0.99)}}


def storm(url: str, seconds: float, workdir: Path) -> dict:
    """Closed loop with no back-off: STORM_CONNECTIONS connections, each resending as soon as answered."""
    script = workdir / "storm.lua"
    script.write_text(STORM_LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{STORM_CONNECTIONS}", f"-d{seconds:g}s", "--timeout", "30s", "-s",
                          str(script), url + "/generate"], capture_output=True, text=True, timeout=seconds + 60)
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"^status (\d+) (\d+)$", out.stdout, re.M)}
    errors = re.search(r"errors connect (\d+) read (\d+) write (\d+) timeout (\d+)", out.stdout)
    return {"codes": codes, "answered": sum(codes.values()),
            "socket_errors": dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()),
                                      strict=True)) if errors else None}


def run_mode(engine: str, seconds: float, storm_seconds: float, factor: float, workdir: Path) -> dict:
    probe_port = free_port()  # /readyz is probed there too: the probes' own thread, at normal priority
    with run_server(workdir, *SERVER_ARGS, "--engine", engine, "--probe-port", str(probe_port)) as server:
        url, probe_url = server.url, f"http://127.0.0.1:{probe_port}"
        before = counters(url)
        report: dict = {"engine": engine, "capacity_before": asyncio.run(capacity(url))}
        time.sleep(1.5)  # the engine's metrics snapshot (sent every second) catches up
        report["step_ms"] = {"capacity": step_ms(delta(counters(url), before))}
        rate = report["capacity_before"] * factor

        pids = [server.proc.pid] + ([engine_pid(server.proc.pid)] if engine == "process" else [])
        before = counters(url)
        with cpu_shares(pids) as shares, probing(url) as probes:
            report["flood"] = asyncio.run(flood(url, rate, seconds))
        report["flood"]["cpu_share"], report["flood"]["readyz_s"] = shares, probes
        time.sleep(1.5)  # the last answers' counters, and a metrics snapshot from the engine
        report["flood"]["server"] = delta(counters(url), before)
        report["flood"]["rss_mib"] = rss_bytes(server.proc.pid) / 2**20

        before = counters(url)
        with cpu_shares(pids) as shares, probing(url) as probes, probing(probe_url, every=0.1) as own:
            report["storm"] = storm(url, storm_seconds, workdir)
        report["storm"]["cpu_share"], report["storm"]["readyz_s"] = shares, probes
        report["storm"]["probe_port_readyz_s"] = own
        time.sleep(1.5)
        report["storm"]["server"] = delta(counters(url), before)
        report["storm"]["rss_mib"] = rss_bytes(server.proc.pid) / 2**20

        report["after_status"] = httpx.post(url + "/generate", json=BODY, timeout=CLIENT_TIMEOUT).status_code
        # Measured again at the end: this shared machine's speed drifts by tens of percent over minutes;
        # goodput is a share of the higher of the two (the stricter reference).
        report["capacity_after"] = asyncio.run(capacity(url))
    report["capacity_req_s"] = cap = max(report["capacity_before"], report["capacity_after"], 1e-9)
    report["step_ms"]["flood"] = step_ms(report["flood"]["server"])
    report["step_ms"]["storm"] = step_ms(report["storm"]["server"])
    report["flood"]["goodput"] = report["flood"]["codes"].get("200", 0) / seconds / cap
    report["storm"]["goodput"] = report["storm"]["codes"].get("200", 0) / storm_seconds / cap
    report["rss_change"] = report["storm"]["rss_mib"] / report["flood"]["rss_mib"] - 1
    report["problems"] = problems(report)
    return report


def admitted_then_timed_out(server_counts: dict) -> tuple[float, float]:
    admitted = server_counts.get("dit_requests_admitted_total", 0.0)
    return admitted, server_counts.get('dit_requests_finished_total{reason="timed_out"}', 0.0)


def problems(report: dict) -> list[str]:
    out = []
    f, s = report["flood"], report["storm"]
    other = {c: v for c, v in f["codes"].items() if c not in ("200", "429", "504")}
    if other:
        out.append(f"flood: answers other than 200/429/504: {other}")
    if f["sent"] != f["answered"]:
        out.append(f"flood: sent {f['sent']} but {f['answered']} answered")
    if f["retry_after_missing"]:
        out.append(f"flood: {f['retry_after_missing']} answers of 429 without Retry-After")
    for name, part in (("flood", f), ("storm", s)):
        server = part["server"]
        received = 2 * part["codes"].get("200", 0)
        dropped = 2 * max(0, sum(v for k, v in server.items() if k.startswith("dit_requests_total")) - part["answered"])
        if not received <= server.get("dit_images_generated_total", 0.0) <= received + dropped:
            out.append(f"{name}: {received} images received (+{dropped} in answers the client dropped), "
                       f"{server.get('dit_images_generated_total', 0):.0f} counted")
        answered = sum(v for k, v in server.items() if k.startswith("dit_requests_total"))
        # wrk drops the requests in flight when it stops: the server answers them to a closed socket.
        in_flight = answered - part["answered"]
        if not 0 <= in_flight <= (STORM_CONNECTIONS if name == "storm" else 0):
            out.append(f"{name}: the server answered {answered:.0f}, the client counted {part['answered']}")
    if s["socket_errors"] and s["socket_errors"]["timeout"]:
        out.append(f"storm: {s['socket_errors']['timeout']} requests hung past 30 s")
    if abs(report["rss_change"]) > 0.10:
        out.append(f"resident memory changed {report['rss_change']:.1%} between the flood and the storm")
    if report["after_status"] != 200:
        out.append(f"the request after the load answered {report['after_status']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="thread,process", help="engine modes to measure, in order")
    p.add_argument("--seconds", type=float, default=60, help="length of the open-loop flood")
    p.add_argument("--storm-seconds", type=float, default=30, help="length of the retry storm")
    p.add_argument("--factor", type=float, default=10, help="flood rate as a multiple of the capacity")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    reports = [run_mode(engine, args.seconds, args.storm_seconds, args.factor, Path(tempfile.mkdtemp()))
               for engine in args.engines.split(",")]
    print(f"| engine | capacity req/s (before / after) | (a) flood {args.factor:g}x, {args.seconds:g} s: goodput | "
          f"(b) storm {STORM_CONNECTIONS} conn, {args.storm_seconds:g} s: goodput | admitted then 504 (a / b) | "
          "CPU (a) / (b): server, engine, load generator | mean step ms: capacity / (a) / (b) "
          "| RSS after (a) → (b) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        shares = []
        for part in (r["flood"], r["storm"]):
            admitted, late = admitted_then_timed_out(part["server"])
            shares.append(f"{late:.0f}/{admitted:.0f} ({late / admitted:.1%})" if admitted else "0/0")
        cpu = " / ".join(", ".join(f"{c:.0%}" for c in r[part]["cpu_share"]) for part in ("flood", "storm"))
        print(f"| {r['engine']} | {r['capacity_before']:.1f} / {r['capacity_after']:.1f} | {r['flood']['goodput']:.0%} "
              f"({r['flood']['codes']}) | {r['storm']['goodput']:.0%} ({r['storm']['codes']}) | "
              f"{' / '.join(shares)} | {cpu} | {' / '.join(f'{v:.0f}' for v in r['step_ms'].values())} "
              f"| {r['flood']['rss_mib']:.0f} → {r['storm']['rss_mib']:.0f} MiB "
              f"({r['rss_change']:+.1%}) |")
    for r in reports:
        latency = " / ".join(f"{v:.2f} s" if v is not None else "-" for v in r["flood"]["latency_200_s"].values())
        probes = "; ".join(f"{part} median {sorted(r[part]['readyz_s'])[len(r[part]['readyz_s']) // 2]:.2f} s, "
                           f"max {max(r[part]['readyz_s']):.2f} s"
                           for part in ("flood", "storm") if r[part]["readyz_s"])
        own = sorted(r["storm"].get("probe_port_readyz_s") or [0.0])
        probes += (f"; --probe-port /readyz every 0.1 s in the storm: p50 {own[len(own) // 2] * 1000:.1f} ms, "
                   f"p99 {own[min(len(own) - 1, int(len(own) * 0.99))] * 1000:.1f} ms, max {own[-1] * 1000:.1f} ms")
        print(f"{r['engine']}: flood 200s answered in {latency} (p50 / p99); /readyz every 0.5 s: {probes}; "
              f"request afterwards {r['after_status']}; problems: "
              + ("; ".join(r["problems"]) or "none"))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    sys.exit(1 if any(r["problems"] for r in reports) else 0)


if __name__ == "__main__":
    main()
