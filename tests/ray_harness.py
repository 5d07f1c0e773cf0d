"""A real Ray cluster of two nodes on this machine, on loopback only, with Serve's HTTP proxy on a free
port: what the Ray tests deploy `server.ray_app:build` on.

Ray picks the machine's network address by itself, even when told 127.0.0.1 (on Linux it swaps a
loopback address for the "reachable" one); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes every Ray process
of the test keep 127.0.0.1. Usage reporting is off; all files go under a temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import httpx
import pytest
from server_harness import free_port, wait_until

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DEDUP_LOGS": "0"}


@contextlib.contextmanager
def ray_cluster(tmp: Path, nodes: int = 2, cpus_per_node: int = 1):
    """Yields the Serve HTTP address (http://127.0.0.1:PORT) of a fresh cluster; the test process is its
    driver (`serve.run`, deployment handles)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: make test installs it (pip install -e '.[ray]')")
    from ray import serve
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in [*RAY_ENV, "RAY_TMPDIR"]}
    os.environ.update(RAY_ENV, RAY_TMPDIR=str(tmp))  # for the nodes' processes
    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable when it imported Ray
    (tmp / "ray").mkdir(exist_ok=True)  # Ray writes the cluster's address there
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            node_ip_address="127.0.0.1", num_cpus=cpus_per_node, include_dashboard=False, temp_dir=str(tmp)))
        for _ in range(nodes - 1):
            cluster.add_node(node_ip_address="127.0.0.1", num_cpus=cpus_per_node)
        ray.init(address=cluster.address, logging_level="WARNING")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = clusters
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deploy(url: str, args: dict, name: str = "dit", timeout: float = 180) -> None:
    """`serve run` the builder with these arguments, and wait until the front door answers ready."""
    from ray import serve

    from server.ray_app import build

    serve.run(build(args), name=name, route_prefix="/", blocking=False)
    wait_until(lambda: _ready(url), timeout, "the Ray deployment to report ready", interval=0.5)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def replica_states(app: str = "dit", deployment: str = "Engine") -> dict[str, int]:
    from ray import serve

    try:
        return dict(serve.status().applications[app].deployments[deployment].replica_states)
    except KeyError:
        return {}


def engine_pids(count: int, timeout: float = 60) -> dict[str, int]:
    """{replica name: pid} of `count` engine replicas (the router picks one per call: ask until all seen)."""
    from ray import serve

    handle = serve.get_deployment_handle("Engine", app_name="dit")
    found: dict[str, int] = {}
    end = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < end:
        info, pid = handle.describe.remote().result(timeout_s=30)
        found[info.replica] = pid
    assert len(found) >= count, f"saw only the engine replicas {found}"
    return found
