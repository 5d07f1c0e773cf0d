"""Hostile and careless clients against the real server (embedded model, loopback only): what each costs.

    python bench/hostile.py [--root TREE] [--cases 1,1b,2,7,8] [--json out.json]

`--root` runs the server of another checkout (e.g. a `git worktree` of an older commit), so that a
before/after table is two runs of this script on the same machine. The cases (issue 28's numbering):
  1   a webhook receiver answers 200 with a 1.5 GB body, twice: the front-end's resident memory (peak
      over its start), the longest /healthz meanwhile, how the deliveries ended;
  1b  a receiver trickles its status line, one byte every 2 s: seconds until the try ends, and how;
  2   560 jobs whose receiver (127.0.0.2) accepts and never answers, then one job to a healthy receiver
      (127.0.0.1): seconds from its submission to its delivery, and which try delivered it (or none);
  7   20,000 connections that never finish their headers (two client processes of 10,000): whether
      /healthz answers meanwhile, its latency, the server's open files;
  8   100 bodies of 5,500 unknown keys (54 KB): the answer's size and the front-end's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import free_port, wait_until  # noqa: E402

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # valid before (any text) and after (whsec_ only)
QUICK = {"class_id": 1, "steps": 1, "cfg_scale": 1.0}
HUGE = 1_500_000_000
TRICKLE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


# ---- the server of a tree --------------------------------------------------------------------------------

class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@contextmanager
def server(root: Path, workdir: Path, *args: str):
    port = free_port()
    log = workdir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--threads", "2", "--data-dir",
           str(workdir / f"data-{port}"), "--webhook-allow-hosts", "127.0.0.1,127.0.0.2", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", DIT_WEBHOOK_SECRET=SECRET, PYTHONPATH=str(root))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
    s = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: proc.poll() is not None or ready(s.url), 180, "the server")
        assert proc.poll() is None, s.logs()[-3000:]
        yield s
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def submit(c: httpx.Client, url: str, body: dict = QUICK) -> str:
    answer = c.post("/jobs", json=body | {"webhook_url": url})
    answer.raise_for_status()
    return answer.json()["id"]


@contextmanager
def healthz_probe(url: str, every: float = 0.1):
    """GET /healthz every `every` s while the block runs: each answer's seconds (a failure counts 30)."""
    seconds: list[float] = []
    stop = threading.Event()

    def probe():
        while not stop.wait(every):
            t0 = time.monotonic()
            try:
                ok = httpx.get(url + "/healthz", timeout=30).status_code == 200
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


# ---- receivers (asyncio, on a thread of their own) -------------------------------------------------------

class Receivers:
    """One asyncio server per (address, behaviour): counts requests and their arrival times."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.arrivals: dict[str, list[tuple[float, str]]] = {}

    def start(self, address: str, behaviour: str) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
                body = await reader.readexactly(length)
                self.arrivals.setdefault(behaviour, []).append((time.monotonic(), json.loads(body)["id"]))
                if behaviour == "stuck":
                    await reader.read()  # until the server hangs up
                elif behaviour == "huge":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE)
                    chunk, sent = b"\0" * (1 << 20), 0
                    while sent < HUGE:
                        writer.write(chunk)
                        await writer.drain()
                        sent += len(chunk)
                elif behaviour == "trickle":
                    for byte in TRICKLE:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(2)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def serve():
            srv = await asyncio.start_server(handle, address, 0, backlog=4096)
            return srv.sockets[0].getsockname()[1]

        port = asyncio.run_coroutine_threadsafe(serve(), self.loop).result()
        return f"http://{address}:{port}/{behaviour}"


def delivered_line(logs: str, job: str) -> str | None:
    m = re.search(rf'webhook (?:delivered|undelivered): job {job}[^\n"]*', logs)
    return m.group(0) if m else None


# ---- the cases ----------------------------------------------------------------------------------------

def case_1(s: Server, receivers: Receivers) -> dict:
    url = receivers.start("127.0.0.2", "huge")
    base, peak, stop = s.rss_mb(), [s.rss_mb()], threading.Event()

    def watch():
        while not stop.wait(0.05):
            peak.append(s.rss_mb())

    threading.Thread(target=watch, daemon=True).start()
    ends = []
    with healthz_probe(s.url) as probes, httpx.Client(base_url=s.url, timeout=60) as c:
        for _ in range(2):
            job = submit(c, url)
            wait_until(lambda job=job: delivered_line(s.logs(), job), 300, "the delivery's end", interval=0.2)
            ends.append(delivered_line(s.logs(), job))
    stop.set()
    return {"rss_start_mb": round(base), "rss_peak_mb": round(max(peak)), "rss_growth_mb": round(max(peak) - base),
            "healthz_max_s": round(max(probes, default=0), 3), "ends": ends}


def case_1b(s: Server, receivers: Receivers) -> dict:
    url = receivers.start("127.0.0.2", "trickle")
    with httpx.Client(base_url=s.url, timeout=60) as c:
        job = submit(c, url)
        wait_until(lambda: receivers.arrivals.get("trickle"), 60, "the first try")
        t0 = receivers.arrivals["trickle"][0][0]

        def first_try_ended():
            logs = s.logs()
            return re.search(rf'webhook (try 1 of job {job}[^\n"]*|delivered: job {job}[^\n"]*)', logs)

        m = wait_until(first_try_ended, 120, "the first try's end", interval=0.2)
    return {"first_try_s": round(time.monotonic() - t0, 1), "how": m.group(0)}


def case_2(s: Server, receivers: Receivers, stuck_jobs: int = 560) -> dict:
    stuck, healthy = receivers.start("127.0.0.2", "stuck"), receivers.start("127.0.0.1", "ok")
    with httpx.Client(base_url=s.url, timeout=60) as c:
        for _ in range(stuck_jobs):
            submit(c, stuck)
        wait_until(lambda: len(receivers.arrivals.get("stuck", [])) >= 8, 120, "the stuck receiver's tries")
        sent = time.monotonic()
        job = submit(c, healthy)
        line = wait_until(lambda: delivered_line(s.logs(), job), 180, "the healthy delivery's end", interval=0.2)
    arrivals = [t for t, j in receivers.arrivals.get("ok", []) if j == job]
    return {"stuck_jobs": stuck_jobs, "stuck_connections_seen": len(receivers.arrivals.get("stuck", [])),
            "healthy_submit_to_delivery_s": round(arrivals[0] - sent, 2) if arrivals else None, "end": line}


def hold_half_open(port: int, count: int, seconds: float) -> None:
    """(A child process) open `count` connections that send part of their headers, hold them `seconds`."""
    socks, failed = [], 0
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        except OSError:
            failed += 1
    print(json.dumps({"opened": len(socks), "failed": failed}), flush=True)
    time.sleep(seconds)


def case_7(s: Server, clients: int = 2, each: int = 10_000, hold: float = 40) -> dict:
    port = s.url.rsplit(":", 1)[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--half-open", f"{port},{each},{hold}"],
                              stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    most_files = 0
    with healthz_probe(s.url, every=0.5) as probes:
        opened = [json.loads(p.stdout.readline()) for p in procs]  # once every connection is open
        for _ in range(20):
            most_files = max(most_files, s.open_files())
            time.sleep(0.5)
    for p in procs:
        p.kill()
        p.wait()
    answered = [p for p in probes if p < 30]
    return {"clients": opened, "server_open_files_max": most_files, "healthz_tries": len(probes),
            "healthz_answered": len(answered), "healthz_max_s": round(max(answered, default=0), 3),
            "alive_after": ready(s.url)}


def case_8(s: Server, requests: int = 100, keys: int = 5500) -> dict:
    body = json.dumps({"class_id": 1, **{f"k{i}": 0 for i in range(keys)}}, separators=(",", ":")).encode()
    with httpx.Client(base_url=s.url, timeout=60, headers={"Content-Type": "application/json"}) as c:
        answer = c.post("/generate", content=body)
        cpu0 = s.cpu_seconds()
        for _ in range(requests):
            c.post("/generate", content=body)
        cpu = (s.cpu_seconds() - cpu0) / requests
    return {"body_bytes": len(body), "status": answer.status_code, "answer_bytes": len(answer.content),
            "frontend_cpu_ms_per_request": round(cpu * 1000, 1)}


CASES = {"1": case_1, "1b": case_1b, "2": case_2, "7": case_7, "8": case_8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server runs")
    p.add_argument("--cases", default="1,1b,2,7,8")
    p.add_argument("--json", type=Path)
    p.add_argument("--half-open", help=argparse.SUPPRESS)  # PORT,COUNT,SECONDS: case 7's client processes
    args = p.parse_args()
    if args.half_open:
        port, count, seconds = args.half_open.split(",")
        hold_half_open(int(port), int(count), float(seconds))
        return
    commit = subprocess.run(["git", "-C", str(args.root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"commit": commit}  # the tree by its commit, not by a path of this machine
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            receivers = Receivers()
            with server(args.root.resolve(), Path(tmp), "--max-jobs", "2000") as s:
                t0 = time.monotonic()
                report[case] = CASES[case](s, receivers) if case in ("1", "1b", "2") else CASES[case](s)
                report[case]["bench_s"] = round(time.monotonic() - t0, 1)
            print(f"case {case}: {json.dumps(report[case])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
