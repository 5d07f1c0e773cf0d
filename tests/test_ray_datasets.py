"""Datasets on a Ray fleet. In-process: the engine router's choice of a replica per shard (`Affinities`:
a shard's chunks stay on the replica it was first given to while that one lives, new shards go to the
replica making the fewest, the map forgets). Slow: a dataset on two engine replicas (two-node loopback
cluster) is made as whole shards by both, and kill -9 of one mid-dataset loses only the shards it was
making, which the other replicas finish; the dataset ends done with every image once."""

from __future__ import annotations

import io
import os
import random
import signal
import tarfile

import httpx
import pytest
from ray_harness import deploy, engine_pids, ray_cluster
from server_harness import wait_until

pytest.importorskip("ray.serve", reason="Ray is not installed: make test installs it (pip install -e '.[ray]')")

# ---- the router's choice, in-process -----------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def affinities(**kw):
    from server.transport.ray.router import Affinities

    clock = Clock()
    return Affinities(clock=clock, rng=random.Random(0), **kw), clock


def idle(name: str) -> int:
    return 0


def test_a_shard_stays_on_the_replica_it_was_first_given_to():
    table, clock = affinities()
    first = table.replica("d/0", ["a", "b"], idle)
    for _ in range(5):  # its later chunks, even while the other replica has the shorter queue
        clock.now += 1
        assert table.replica("d/0", ["a", "b"], lambda n: 0 if n != first else 9) == first


def test_new_shards_go_to_the_replica_making_the_fewest_then_the_shorter_queue():
    table, _ = affinities()
    queues = {"a": 3, "b": 1, "c": 2}
    # all hold none: the shortest queue; then each new shard to one holding none, until all hold one
    assert [table.replica(f"d/{k}", ["a", "b", "c"], queues.get) for k in range(3)] == ["b", "c", "a"]
    assert sorted(table.replica(f"d/{k}", ["a", "b", "c"], idle) for k in range(3, 9)) == ["a", "a", "b", "b",
                                                                                         "c", "c"]
    assert table.held() == {"a": 3, "b": 3, "c": 3}


def test_the_shards_of_a_gone_replica_move_to_a_live_one_and_stay_there():
    table, _ = affinities()
    owners = {k: table.replica(f"d/{k}", ["a", "b"], idle) for k in range(4)}
    lost = [k for k, r in owners.items() if r == "a"]
    assert len(lost) == 2
    # "a" killed, its replacement "c" started: the retried chunks of a's shards go to the one holding fewest
    moved = {k: table.replica(f"d/{k}", ["b", "c"], idle) for k in lost}
    assert set(moved.values()) == {"c"}
    assert all(table.replica(f"d/{k}", ["b", "c"], idle) == r for k, r in moved.items())  # and stay
    assert table.replica("d/x", [], idle) is None  # none live: Serve waits for one


def test_the_map_forgets_idle_shards_and_keeps_within_its_size():
    table, clock = affinities(remember_s=100, limit=3, active_s=10)
    table.replica("d/0", ["a", "b"], idle)
    clock.now = 50
    table.replica("d/1", ["a", "b"], idle)
    assert table.held() == {table.replica("d/1", ["a", "b"], idle): 1}  # d/0 idle 50 s: no longer in use
    clock.now = 120  # d/0 idle 120 s: forgotten; d/1 (70 s) still known
    table.replica("d/2", ["a", "b"], idle)
    assert len(table) == 2
    for k in range(3, 6):
        table.replica(f"d/{k}", ["a", "b"], idle)
    assert len(table) == 3  # the least recently used went first


def test_only_engine_requests_carry_an_affinity_and_the_engine_deployment_uses_the_router():
    from ray.serve.request_router import PendingRequest

    from model.samplers import Sampling
    from server.engine.request import EngineRequest
    from server.ray_app import engine_options
    from server.transport.ray.args import parse_args
    from server.transport.ray.router import AffinityRouter, affinity_of

    def pending(*args):
        return PendingRequest(args=list(args), kwargs={}, metadata=None)

    chunk = EngineRequest("c", 1, (7,), Sampling("ddim", 10, 1.0), 0.0, 1.0, affinity="d/3")
    assert affinity_of(pending(chunk)) == "d/3"
    assert affinity_of(pending(EngineRequest("r", 1, (7,), Sampling("ddim", 10, 1.0), 0.0, 1.0))) is None
    assert affinity_of(pending("crash", 1)) is None and affinity_of(pending()) is None and affinity_of(None) is None
    config = engine_options(*parse_args({}))["request_router_config"]
    assert config.get_request_router_class() is AffinityRouter


# ---- a real cluster -------------------------------------------------------------------------------------
FLEET = {"threads": 1, "max_batch_rows": 16, "request_timeout": 60, "log_format": "text",
         "min_replicas": 2, "max_replicas": 2, "deadline_admission": False}


def replica_steps(url: str) -> dict[str, float]:
    """Each engine replica's dit_denoise_steps_total, from the front-end's /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("dit_denoise_steps_total{"):
            out[line.split('replica="', 1)[1].split('"', 1)[0]] = float(line.split()[-1])
    return out


@pytest.mark.slow
def test_a_dataset_spreads_over_the_replicas_and_survives_a_replica_kill(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayds")
    with ray_cluster(tmp) as url:
        deploy(url, dict(FLEET, data_dir=str(tmp / "data")))
        pids = engine_pids(2)
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {"classes": "all", "per_class": 16, "shard_size": 32, "steps": 30, "sampler": "ddim", "seed": 3}
            dataset_id = c.post("/datasets", json=body).json()["id"]
            wait_until(lambda: len([v for v in replica_steps(url).values() if v > 0]) == 2, 120,
                       "both replicas to work on the dataset")
            victim, pid = next(iter(pids.items()))
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: c.get(f"/datasets/{dataset_id}").json()["status"] != "running", 600, "the dataset",
                       interval=1)
            status = c.get(f"/datasets/{dataset_id}").json()
            assert status["status"] == "done" and status["images_done"] == 160, status
            names = []
            for entry in c.get(f"/datasets/{dataset_id}/manifest").json()["shards"]:
                names += [m.name for m in tarfile.open(fileobj=io.BytesIO(c.get(entry["url"]).content)).getmembers()]
            assert len(names) == len(set(names)) == 320  # 160 images, a .png and a .json each, none twice
