"""A Ray Serve fleet that follows its queue, watched by a real Prometheus: on a two-node loopback cluster,
one engine replica at rest becomes two under sustained load and one again after it, with no request
lost; Prometheus tells the replicas apart, and every dashboard query has data."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest
from ray_harness import deploy, ray_cluster, replica_states
from server_harness import ROOT, free_port, wait_until
from test_monitoring import GPU_ONLY, check_dashboard, need

pytest.importorskip("ray.serve", reason="Ray is not installed: make test installs it (pip install -e '.[ray]')")

AUTOSCALED = {"threads": 1, "max_batch_rows": 8, "request_timeout": 60, "log_format": "text",
              "min_replicas": 1, "max_replicas": 2, "target_queue_depth": 2,
              "upscale_delay_s": 2, "downscale_delay_s": 6}
BODY = {"class_id": 4, "steps": 25, "num_images": 2, "sampler": "ddim"}


class Load:
    """Closed-loop clients, each sending the next request when the last is answered; every answer kept."""

    def __init__(self, url: str):
        self.url, self.answers, self._stop, self._threads = url, [], threading.Event(), []

    def add(self, clients: int) -> None:
        for _ in range(clients):
            stop = threading.Event()
            thread = threading.Thread(target=self._client, args=(stop,), daemon=True)
            self._threads.append((thread, stop))
            thread.start()

    def remove(self, clients: int) -> None:
        for thread, stop in self._threads[-clients:]:
            stop.set()
            thread.join(120)
        del self._threads[-clients:]

    def _client(self, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/generate", json=BODY)
                self.answers.append((r.status_code, r.headers.get("x-replica"), r.text if r.status_code != 200 else ""))


def running() -> int:
    return replica_states().get("RUNNING", 0)


def total(query, expr: str) -> float:
    result = query(expr)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def fleet_and_prometheus(tmp_path_factory):
    prom = need("prometheus", "prometheus")
    tmp = tmp_path_factory.mktemp("ray")
    with ray_cluster(tmp) as url:
        deploy(url, dict(AUTOSCALED, data_dir=str(tmp / "data")))  # the front-end's job store: this test's own
        port = free_port()
        target = url.removeprefix("http://")
        (tmp / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{ROOT / 'deploy' / 'prometheus' / 'alerts.yml'}']\n"
            f"scrape_configs: [{{job_name: dit-serve, static_configs: [{{targets: ['{target}']}}]}}]\n")
        proc = subprocess.Popen([prom, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=open(tmp / "prometheus.log", "wb"))
        try:
            def query(expr: str) -> dict:
                return httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10).json()

            def scraping() -> bool:
                try:
                    return total(query, 'up{job="dit-serve"}') == 1
                except (httpx.TransportError, ValueError):
                    return False

            wait_until(scraping, 60, "Prometheus to scrape the Ray deployment", interval=0.5)
            yield url, query
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.mark.slow
def test_one_replica_at_rest_two_under_load_one_after_with_nothing_lost(fleet_and_prometheus):
    url, query = fleet_and_prometheus
    assert running() == 1
    load = Load(url)
    t0 = time.monotonic()
    load.add(8)  # 8 requests in flight against a target of 2 per replica
    wait_until(lambda: running() == 2, 90, "Serve to add a replica under load", interval=0.5)
    scaled_up = time.monotonic() - t0

    # both replicas serve, and Prometheus tells them apart by label
    wait_until(lambda: len({r for s, r, _ in load.answers[-16:] if s == 200}) == 2, 60, "both replicas serving")
    wait_until(lambda: total(query, "count(count by (replica) (rate(dit_step_duration_seconds_count[1m]) > 0))") == 2,
               30, "Prometheus to scrape both replicas' step counters", interval=0.5)
    time.sleep(3)  # a few scrapes with both replicas busy: every rate() has two points
    assert check_dashboard(query, GPU_ONLY) == []
    assert total(query, "max(dit_fleet_replicas)") == 2 and total(query, "max(dit_fleet_replicas_target)") == 2

    # the load drops to one client: Serve removes a replica, which finishes what it holds first
    load.remove(7)
    t1 = time.monotonic()
    wait_until(lambda: running() == 1 and sum(replica_states().values()) == 1, 90,
               "Serve to remove the idle replica", interval=0.5)
    scaled_down = time.monotonic() - t1
    time.sleep(2)
    load.remove(1)
    print(f"\nscale-up 1 -> 2: {scaled_up:.1f} s under load (upscale_delay_s=2); scale-down 2 -> 1: "
          f"{scaled_down:.1f} s after the load fell (downscale_delay_s=6); {len(load.answers)} requests")

    failed = [a for a in load.answers if a[0] != 200]
    assert not failed, failed[:5]
    # the books balance on the server too: every admitted request finished (none failed or timed out)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/generate", json=BODY).status_code == 200
    # a scrape taken while the last request was in flight counts it admitted but not yet finished: wait for
    # one taken after its answer
    wait_until(lambda: total(query, 'sum(dit_requests_finished_total{reason="finished"})') >= len(load.answers) + 1,
               30, "Prometheus to see the last requests finished", interval=0.5)
    assert total(query, "sum(dit_requests_admitted_total)") == total(
        query, 'sum(dit_requests_finished_total{reason="finished"})') == len(load.answers) + 1
