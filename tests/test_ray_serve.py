"""Scale-out on Ray Serve (server/ray_app.py): the builder's arguments offline, then a real two-node Ray
cluster on loopback serving two engine replicas of the embedded model, one CPU thread each."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import httpx
import pytest
from ray_harness import deploy, engine_pids, ray_cluster, replica_states
from server_harness import ROOT, wait_until

serve_schema = pytest.importorskip("ray.serve.schema", reason="Ray is not installed: make test installs it")

REQUEST_TIMEOUT = 30
# Without deadline admission: these tests are about serving everything, and whether a burst fits half of
# its 30 s depends on how fast this machine runs at that moment (the estimate itself is tested with plain
# numbers in tests/test_admission.py and tests/test_fleet_client.py).
FLEET = {"threads": 1, "max_batch_rows": 16, "request_timeout": REQUEST_TIMEOUT, "log_format": "text",
         "min_replicas": 2, "max_replicas": 2, "deadline_admission": False}


# ---- offline: the builder's arguments and the Serve config file ---------------------------------------
def test_the_serve_config_file_passes_rays_schema_and_the_builders_model():
    import yaml

    from server.transport.ray.args import parse_args

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    schema = serve_schema.ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "server.ray_app:build"
    fleet, settings = parse_args(app.args)
    assert fleet.min_replicas == fleet.max_replicas == 2 and settings.threads == 1


@pytest.mark.parametrize("args, message", [
    ({"min_replica": 2}, "min_replica: unknown argument"),  # misspelled
    ({"max_replicas": 1, "min_replicas": 2}, "min_replicas (2) must not exceed max_replicas (1)"),
    ({"colour": "red"}, "colour: unknown argument"),
    ({"port": 9000}, "port: not an argument on Ray"),
    ({"max_queue": -1}, "max_queue: Input should be greater than or equal to 0"),
    ({"policy": "fifo"}, "policy: Input should be 'continuous', 'request' or 'none'"),
])
def test_bad_builder_arguments_fail_with_their_name(args, message):
    from server.ray_app import build

    with pytest.raises(ValueError) as e:
        build(args)
    assert message in str(e.value) and "server.ray_app:build" in str(e.value)


def test_the_builder_sizes_rays_limits_from_the_engines():
    """Serve's default of 5 requests per replica would starve the batcher: an engine takes its queue plus
    what can run. A fixed count has no autoscaler; a range gets one on the queue depth."""
    from server.ray_app import build, engine_options
    from server.transport.ray.args import parse_args

    fixed = engine_options(*parse_args({"max_queue": 32, "max_batch_rows": 16, "min_replicas": 2, "max_replicas": 2,
                                        "request_timeout": 60}))
    assert fixed["max_ongoing_requests"] == 48 and fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["graceful_shutdown_timeout_s"] > 60  # a replica being removed finishes what it admitted
    scaled = engine_options(*parse_args({"min_replicas": 1, "max_replicas": 3, "target_queue_depth": 4}))
    config = scaled["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"]) == (1, 3, 4)
    assert "num_replicas" not in scaled
    build({"min_replicas": 1, "max_replicas": 3})  # Serve accepts the options (it checks them in .options)


# ---- a real cluster -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    with ray_cluster(tmp) as url:
        deploy(url, dict(FLEET, data_dir=str(tmp / "data")))  # the front-end's job store: this test's own
        yield url


def _mixed(k: int) -> tuple[str, dict, dict]:
    """(path, body, headers): images, JSON, event streams and async jobs, several samplers and sizes."""
    body = {"class_id": k % 10, "steps": 5 + (k % 3) * 5, "seed": 100 + k, "num_images": 1 + k % 2,
            "sampler": ("ddim", "ddpm", "dpm-solver++")[k % 3]}
    kind = k % 4
    if kind == 0:
        return "/generate", body, {}
    if kind == 1:
        return "/generate", body, {"Accept": "application/json"}
    if kind == 2:
        return "/generate", body, {"Accept": "text/event-stream"}
    return "/jobs", body, {}


def _send(url: str, k: int) -> tuple[int, str | None]:
    """One mixed request to the end: (status, the engine replica that served it)."""
    path, body, headers = _mixed(k)
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT + 15) as c:
        r = c.post(path, json=body, headers=headers)
        if path == "/jobs" and r.status_code == 202:
            job = r.json()["id"]
            wait_until(lambda: c.get(f"/jobs/{job}").json()["status"] in ("done", "failed"), REQUEST_TIMEOUT,
                       "the job to finish", interval=0.2)
            r = c.get(f"/jobs/{job}/result")
        if "text/event-stream" in headers.get("Accept", "") and r.status_code == 200:  # headers went out first
            results = [e for e in r.text.split("\n\n") if e.startswith("event: result")]
            if not results:  # an error event: report it, as the other answers report their status
                return r.text[-500:], None
            return r.status_code, json.loads(results[0].split("data: ", 1)[1])["replica"]
        return r.status_code, r.headers.get("x-replica")


@pytest.mark.slow
def test_two_replicas_on_two_nodes_serve_everything(fleet):
    with cf.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda k: _send(fleet, k), range(40)))
    assert [s for s, _ in answers] == [200] * 40, answers
    served_by = {r for s, r in answers if s == 200}
    assert len(served_by) == 2 and all(r.startswith("Engine#") for r in served_by), answers
    # Ray placed one replica on each node (each node offers one CPU, each replica reserves one)
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


@pytest.mark.slow
def test_the_same_seed_gives_the_same_bytes_on_either_replica(fleet):
    import concurrent.futures as cf

    body = {"class_id": 7, "steps": 10, "seed": 4242, "sampler": "ddpm"}
    images: dict[str, bytes] = {}
    # Four at once: the router counts a request it sent against its replica's queue, so the others of a
    # round go to the other replica (one at a time, a stale queue length left by an earlier test's long job
    # once sent all 40 to one replica).
    with httpx.Client(base_url=fleet, timeout=60) as c, cf.ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            for r in pool.map(lambda _: c.post("/generate", json=body), range(4)):
                assert r.status_code == 200
                images.setdefault(r.headers["x-replica"], r.content)
            if len(images) == 2:
                break
    assert len(images) == 2
    a, b = images.values()
    assert a == b


@pytest.mark.slow
def test_a_job_is_polled_fetched_and_cancelled_through_other_requests(fleet):
    body = {"class_id": 1, "steps": 10, "seed": 9}
    with httpx.Client(base_url=fleet, timeout=60) as make, httpx.Client(base_url=fleet, timeout=60) as other:
        job = make.post("/jobs", json=body).json()["id"]
        wait_until(lambda: other.get(f"/jobs/{job}").json()["status"] == "done", 30, "the job", interval=0.2)
        result = other.get(f"/jobs/{job}/result")
        assert result.status_code == 200 and result.headers["content-type"] == "image/png"
        assert result.headers["x-replica"].startswith("Engine#")
        # a long job, cancelled through a third connection while it runs or waits
        long = make.post("/jobs", json={"class_id": 2, "steps": 250, "num_images": 8, "seed": 1}).json()["id"]
        with httpx.Client(base_url=fleet, timeout=60) as third:
            assert third.delete(f"/jobs/{long}").status_code == 200
        wait_until(lambda: other.get(f"/jobs/{long}").json()["status"] == "cancelled", 30, "the cancellation")
        answer = other.get(f"/jobs/{long}/result")
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "cancelled"


@pytest.mark.slow
def test_killing_a_replica_mid_load_gives_clean_answers_and_ray_brings_it_back(fleet):
    pids = engine_pids(2)
    victim, pid = next(iter(pids.items()))
    statuses: list[tuple[int, dict | None, str | None, float]] = []

    def one(k: int):
        t0 = time.monotonic()
        body = {"class_id": k % 10, "steps": 20, "seed": k, "num_images": 2}
        with httpx.Client(base_url=fleet, timeout=REQUEST_TIMEOUT + 15) as c:
            r = c.post("/generate", json=body)
        error = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
        statuses.append((r.status_code, error, r.headers.get("x-replica"), time.monotonic() - t0))

    with cf.ThreadPoolExecutor(8) as pool:
        first = [pool.submit(one, k) for k in range(16)]
        # the victim has taken requests (a counter in its report: true once true, whenever it is read)
        wait_until(lambda: _replica_counter(fleet, "dit_denoise_steps_total", victim) > 0, 30,
                   "the replica to be killed to take requests")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        later = [pool.submit(one, k) for k in range(16, 48)]
        for f in (*first, *later):
            f.result()
    for status, error, _, seconds in statuses:
        assert seconds < REQUEST_TIMEOUT + 5  # nothing hangs past its timeout
        assert status == 200 or (status == 503 and error["error"]["code"] == "engine_died"), (status, error)
    assert any(s == 200 and r != victim for s, _, r, _ in statuses)  # the other replica kept serving

    def back() -> bool:
        return replica_states().get("RUNNING") == 2 and victim not in engine_pids(2, timeout=10)

    wait_until(back, 60, "Ray to bring the killed replica back")
    recovery = time.monotonic() - killed_at
    print(f"\nreplica recovery after kill -9: {recovery:.1f} s; answers: "
          f"{sum(s == 200 for s, *_ in statuses)} x 200, {sum(s == 503 for s, *_ in statuses)} x 503")
    with httpx.Client(base_url=fleet, timeout=60) as c:
        assert c.get("/readyz").status_code == 200
        assert c.post("/generate", json={"class_id": 3, "steps": 5}).status_code == 200


def _replica_counter(fleet: str, name: str, replica: str) -> float:
    """One replica's series from the front-end's /metrics (0 when absent)."""
    for line in httpx.get(fleet + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and f'replica="{replica}"' in line:
            return float(line.split()[-1])
    return 0.0
