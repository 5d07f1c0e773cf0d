"""Monitoring as deployed: a real Prometheus scrapes a real server under load; the dashboard's queries,
the alert rules and the compose file are checked with the real tools."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest
import yaml
from conftest import require_installed
from server_harness import ROOT, free_port, run_server, wait_until

from server.engine.metrics import EngineMetrics

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dit-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
GPU_ONLY = {"GPU memory", "GPU utilisation"}
FLEET_ONLY = {"Replicas"}  # Ray Serve's fleet gauges; a single server has none


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    require_installed(path is not None, binary, f"apt-get install {package}")
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def check_dashboard(query: Callable[[str], dict], allow_empty: set[str], replica: str = ".*") -> list[str]:
    """Run every dashboard query as Grafana sends it (the replica variable at `replica`; its All is `.*`),
    fail on one Prometheus rejects, and return the panels ("title: query") that have no data, except
    those in allow_empty. `query` sends one instant query to Prometheus and returns its JSON answer."""
    empty = []
    for title, expr in dashboard_queries():
        answer = query(expr.replace("$__rate_interval", "1m").replace("$replica", replica))
        assert answer["status"] == "success", f"{title}: {expr}: {answer.get('error')}"
        if not answer["data"]["result"] and title not in allow_empty:
            empty.append(f"{title}: {expr}")
    return empty


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
                except (httpx.TransportError, ValueError):  # not listening yet, or 503 text while it starts
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
    empty = check_dashboard(query, GPU_ONLY | FLEET_ONLY)  # replica=~".*" also matches series without it
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
                                          "DitHighLatency", "DitFleetBelowTarget"}
    assert all(r["health"] == "ok" for r in found), [(r["name"], r.get("lastError")) for r in found]
    assert all(r["state"] == "inactive" for r in found)  # a healthy server fires nothing


def test_promtool_accepts_the_shipped_config_and_rules():
    promtool = need("promtool", "prometheus")
    subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")], check=True,
                   capture_output=True)
    subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], check=True,
                   capture_output=True)


# The two metric shapes one scrape target can have: a single server (no `replica` label) and a Ray Serve
# front-end (its own series unlabelled, each engine replica's labelled `replica`, and the fleet gauges).
TARGET = {"job": "dit-serve", "instance": "dit:8000"}
ENGINE_SHAPES = {"single": [{}], "ray": [{"replica": "Engine#a"}, {"replica": "Engine#b"}]}


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _series(name: str, labels: dict, values: str) -> dict:
    return {"series": name + _labels({**TARGET, **labels}), "values": values}


def _unit_test(shape: str, busy_share: str) -> dict:
    """Everything wrong at once, in one shape: each rule must fire, with the labels it fires with."""
    engines = ENGINE_SHAPES[shape]
    front = [_series("up", {}, "0x30"), _series("dit_ready", {}, "0x30"), _series("dit_queue_capacity", {}, "10x30"),
             _series("dit_requests_total", {"code": "200"}, "0+90x30"),  # 10% 5xx
             _series("dit_requests_total", {"code": "503"}, "0+10x30"),
             _series("dit_request_duration_seconds_bucket", {"le": "10"}, "0x30"),  # every request 10-60 s
             _series("dit_request_duration_seconds_bucket", {"le": "60"}, "0+100x30"),
             _series("dit_request_duration_seconds_bucket", {"le": "+Inf"}, "0+100x30")]
    # The first engine's queue is 9/10 full, any other's 2/10. Each device is busy half the time.
    engine = [s for i, e in enumerate(engines) for s in (
        _series("dit_queue_depth", e, "9x30" if i == 0 else "2x30"),
        _series("dit_step_duration_seconds_sum", e, "0+24x30"),
        _series("dit_decode_duration_seconds_sum", e, "0+6x30"))]
    fleet = [_series("dit_fleet_replicas", {}, "2x30"), _series("dit_fleet_replicas_target", {}, "3x30")]
    target = {"exp_labels": {**TARGET, "severity": "critical"}}
    alerts = {"DitServerDown": [target], "DitNotReady": [target],
              "DitQueueSaturated": [{"exp_labels": {**TARGET, **engines[0], "severity": "warning"}}],
              "DitHighErrorRatio": [{"exp_labels": {"severity": "warning"}}],
              "DitHighLatency": [{"exp_labels": {"severity": "warning"}}],
              "DitFleetBelowTarget": [{"exp_labels": {"severity": "warning"}}] if shape == "ray" else []}
    return {"interval": "1m", "input_series": front + engine + (fleet if shape == "ray" else []),
            "alert_rule_test": [{"eval_time": "20m", "alertname": a, "exp_alerts": exp} for a, exp in alerts.items()],
            # the dashboard's busy share is one line per device, not the sum over devices
            "promql_expr_test": [{"expr": busy_share, "eval_time": "20m",
                                  "exp_samples": [{"labels": _labels(e), "value": 0.5} for e in engines]}]}


@pytest.mark.parametrize("shape", ENGINE_SHAPES)
def test_alert_rules_fire_on_both_metric_shapes(shape, tmp_path):
    """Each rule fires on a single server's series and on a Ray front-end's: none silently matches nothing
    because of the replica label (promtool test rules; JSON is YAML to it)."""
    promtool = need("promtool", "prometheus")
    rules = yaml.safe_load(ALERTS.read_text())
    for rule in rules["groups"][0]["rules"]:
        rule.pop("annotations")  # promtool would compare them too; they are prose, checked by `check rules`
    (tmp_path / "rules.yml").write_text(json.dumps(rules))
    test = _unit_test(shape, dict(dashboard_queries())["Device busy share"]
                      .replace("$__rate_interval", "5m").replace("$replica", ".*"))
    assert {t["alertname"] for t in test["alert_rule_test"]} == {r["alert"] for r in rules["groups"][0]["rules"]}
    (tmp_path / "test.yml").write_text(json.dumps({"rule_files": ["rules.yml"], "evaluation_interval": "1m",
                                                  "tests": [test]}))
    out = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_engine_queries_select_the_replica_variable():
    """Every engine series on the dashboard is filtered by $replica (front-end series have no replica)."""
    engine = {m.name for m in EngineMetrics().registry.collect()} | {"dit_gpu_memory"}
    unfiltered = [f"{title}: {name}" for title, expr in dashboard_queries()
                  for name, selector in re.findall(r"\b(dit_[a-z_]+)(\{[^}]*\})?", expr)
                  if any(name == e or name.startswith(e + "_") for e in engine)
                  and 'replica=~"$replica"' not in selector]
    assert not unfiltered, unfiltered
    (var,) = [v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "replica"]
    assert var["query"] == "label_values(dit_step_duration_seconds_count, replica)"
    assert var["multi"] and var["includeAll"] and var["allValue"] == ".*"


def test_dashboard_is_provisioned_and_documented():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "dit-serve" and all(p["datasource"]["uid"] == "prometheus" for p in dash["panels"])
    provisioning = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "uid: prometheus" in provisioning
    doc = (DEPLOY / "README.md").read_text()
    for title, expr in dashboard_queries():
        assert f"**{title}**" in doc, f"deploy/README.md does not describe the panel {title!r}"
        assert f"`{expr}`" in doc, f"deploy/README.md does not show the query of {title!r}: {expr}"
    for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]:
        assert f"| {rule['alert']} |" in doc, f"deploy/README.md does not list the alert {rule['alert']}"


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
