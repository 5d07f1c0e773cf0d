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
import time

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


@pytest.mark.slow
def test_a_dataset_is_made_as_whole_shards_by_both_replicas_and_survives_a_replica_kill(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayds")
    with ray_cluster(tmp) as url:
        deploy(url, dict(FLEET, data_dir=str(tmp / "data")))
        pids = engine_pids(2)
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {"classes": "all", "per_class": 16, "shard_size": 32, "steps": 30, "sampler": "ddim", "seed": 3}
            started = time.monotonic()
            dataset_id = c.post("/datasets", json=body).json()["id"]

            def shards() -> list[dict]:
                return c.get(f"/datasets/{dataset_id}/manifest").json()["shards"]

            def one_from_each() -> list[dict] | None:
                done = shards()
                return done if {r for e in done for r in e["replicas"]} == set(pids) else None

            # Each replica has finished a shard of its own: then kill one, mid-dataset (5 shards of 2 chunks).
            before = wait_until(one_from_each, 600, "a finished shard from each replica", interval=0.5)
            victim = before[-1]["replicas"][0]  # either one: each is making a shard now
            os.kill(pids[victim], signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: c.get(f"/datasets/{dataset_id}").json()["status"] != "running", 600, "the dataset",
                       interval=1)
            print(f"\n{len(before)} shards before the kill at {killed - started:.0f} s; the dataset ended "
                  f"{time.monotonic() - killed:.0f} s after it")
            status = c.get(f"/datasets/{dataset_id}").json()
            assert status["status"] == "done" and status["images_done"] == 160, status
            after = shards()
            names = []
            for entry in after:
                names += [m.name for m in tarfile.open(fileobj=io.BytesIO(c.get(entry["url"]).content)).getmembers()]
            assert len(names) == len(set(names)) == 320  # 160 images, a .png and a .json each, none twice
    # Before the kill every shard was made by one replica, and both made some.
    assert all(len(e["replicas"]) == 1 for e in before), before
    # After it, only a shard the victim was making can have two makers (its chunks finished there are kept,
    # the rest made elsewhere); the dataset has at most 2 chunks in the engines (max_batch_rows 16), so at
    # most 2 such shards. Every other shard is one replica's.
    split = [e for e in after if len(e["replicas"]) > 1]
    assert len(split) <= 2 and all(victim in e["replicas"] for e in split), after
    print("makers per shard:", [e["replicas"] for e in after])
