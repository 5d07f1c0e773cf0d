"""A dataset on a Ray fleet of two engine replicas (two-node loopback cluster): its chunks spread over
both replicas, and kill -9 of one mid-dataset loses only the chunks it held, which the other makes again;
the dataset ends done with every image once."""

from __future__ import annotations

import io
import os
import signal
import tarfile

import httpx
import pytest
from ray_harness import deploy, engine_pids, ray_cluster
from server_harness import wait_until

pytest.importorskip("ray.serve", reason="Ray is not installed: make test installs it (pip install -e '.[ray]')")

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
