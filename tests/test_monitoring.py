"""Monitoring as deployed: a real Prometheus scrapes a real server under load; the dashboard's queries,
the alert rules and the compose file are checked with the real tools."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest
from conftest import require_installed
from server_harness import ROOT, free_port, run_server, wait_until

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dit-serve.json"
GPU_ONLY = {"GPU memory", "GPU utilisation"}


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    require_installed(path is not None, binary, f"apt-get install {package}")
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


@pytest.fixture(scope="module")
def prometheus_with_server(tmp_path_factory):
    prom = need("prometheus", "prometheus")
    tmp = tmp_path_factory.mktemp("prom")
    with run_server(tmp, "--max-batch-rows", "16") as server:
        port = free_port()
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp / "alerts.yml")
        target = server.url.removeprefix("http://")
        (tmp / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [alerts.yml]\n"
            f"scrape_configs: [{{job_name: dit-serve, static_configs: [{{targets: ['{target}']}}]}}]\n"
        )
        proc = subprocess.Popen([prom, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=open(tmp / "prometheus.log", "wb"))
        url = f"http://127.0.0.1:{port}"
        try:
            def query(expr: str) -> dict:
                return httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()

            def scraped(n: int):
                try:
                    r = query('count_over_time(up{job="dit-serve"}[1m])')["data"]["result"]
                    return r and float(r[0]["value"][1]) >= n
                except httpx.TransportError:
                    return False

            wait_until(lambda: scraped(2), 60, "Prometheus to scrape the server")
            with server.client() as c, cf.ThreadPoolExecutor(8) as pool:  # a short load, some of it bad
                bodies = [{"class_id": k % 10, "steps": 10 + 5 * (k % 3), "seed": k} for k in range(16)]
                assert all(r.status_code == 200 for r in pool.map(lambda b: c.post("/generate", json=b), bodies))
                assert c.post("/generate", json={"class_id": 99}).status_code == 422
            time.sleep(3)  # a few more scrapes after the load
            yield query, url
        finally:
            proc.terminate()
            proc.wait(30)


def test_every_dashboard_query_parses_and_non_gpu_panels_have_data(prometheus_with_server):
    query, _ = prometheus_with_server
    empty = []
    for title, expr in dashboard_queries():
        answer = query(expr.replace("$__rate_interval", "1m"))
        assert answer["status"] == "success", f"{title}: {expr}: {answer.get('error')}"
        if not answer["data"]["result"] and title not in GPU_ONLY:
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_counters_match_the_load(prometheus_with_server):
    query, _ = prometheus_with_server

    def value(expr):
        return float(query(expr)["data"]["result"][0]["value"][1])

    assert value('sum(dit_requests_total{code="200"})') >= 16 and value('sum(dit_requests_total{code="422"})') == 1
    assert value("sum(dit_images_generated_total)") >= 16


def test_alert_rules_load_and_evaluate(prometheus_with_server):
    _, url = prometheus_with_server

    def rules():
        groups = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        found = [r for g in groups for r in g["rules"]]
        return found if found and all(r.get("lastEvaluation", "").startswith("20") for r in found) else None

    found = wait_until(rules, 30, "the alert rules to be evaluated")
    assert {r["name"] for r in found} == {"DitServerDown", "DitNotReady", "DitQueueSaturated", "DitHighErrorRatio",
                                          "DitHighLatency"}
    assert all(r["health"] == "ok" for r in found), [(r["name"], r.get("lastError")) for r in found]
    assert all(r["state"] == "inactive" for r in found)  # a healthy server fires nothing


def test_promtool_accepts_the_shipped_config_and_rules():
    promtool = need("promtool", "prometheus")
    subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")], check=True,
                   capture_output=True)
    subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], check=True,
                   capture_output=True)


def test_dashboard_is_provisioned_and_documented():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "dit-serve" and all(p["datasource"]["uid"] == "prometheus" for p in dash["panels"])
    provisioning = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "uid: prometheus" in provisioning
    doc = (DEPLOY / "README.md").read_text()
    for title, _ in dashboard_queries():
        assert f"**{title}**" in doc, f"deploy/README.md does not describe the panel {title!r}"


@pytest.mark.parametrize("profile", [None, "cpu", "gpu-metrics"])
def test_compose_file_validates(profile):
    compose = need("docker-compose", "docker-compose")
    cmd = [compose, "-f", str(ROOT / "docker-compose.yml")] + (["--profile", profile] if profile else []) + ["config"]
    env = dict(os.environ, GRAFANA_ADMIN_PASSWORD="test")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "driver: nvidia" in out.stdout and "service_completed_successfully" in out.stdout
    missing = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
                             env={k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in missing.stderr  # no default password
