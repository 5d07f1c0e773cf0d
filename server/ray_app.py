"""Scale-out on Ray Serve: `serve run server.ray_app:build key=value ...` or a Serve config file
(deploy/ray/serve.yaml). Two deployments:

    Serve's HTTP proxies -> Frontend (1 replica: HTTP, validation, jobs, encoding, /metrics)
                              -> Engine replicas (min..max, one device each: scheduler + model runner)

The arguments are the dit-serve settings by name plus the fleet's (server/fleet/args.py). Ray's
defaults changed here, and why:
  - max_ongoing_requests: Serve would let 5 requests into a replica at a time, starving its batcher;
    an engine takes its queue (max_queue) plus what can run (max_batch_rows) and refuses the rest
    itself (429).
  - max_queued_requests: when every replica is full, a bounded wait at the router, then 429 queue_full
    (instead of an unbounded queue in the front-end).
  - autoscaling on Serve's ongoing requests per replica, which for an engine is its queued plus
    in-flight requests: target_ongoing_requests = target_queue_depth.
  - graceful_shutdown_timeout_s > request_timeout: a replica being removed finishes what it admitted.
  - health checks every 5 s call the engine's own check (device usable, engine thread alive).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .fleet.args import FleetArgs, parse_args
from .fleet.engine_replica import EngineReplica
from .fleet.frontend import Frontend
from .settings import Settings

FRONTEND, ENGINE = "Frontend", "Engine"
LOOK_BACK_MIN_S = 11.0
FRONTEND_MAX_ONGOING = 1024  # HTTP requests in the front-end at once (streams and job polls included)


def build(args: dict[str, Any]) -> Application:
    fleet, settings = parse_args(args)
    engine = serve.deployment(EngineReplica, name=ENGINE).options(**engine_options(fleet, settings))
    frontend = serve.deployment(Frontend, name=FRONTEND).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=FRONTEND_MAX_ONGOING, graceful_shutdown_timeout_s=settings.request_timeout + 10,
    )
    return frontend.bind(settings, engine.bind(settings, FRONTEND), ENGINE)


def engine_options(fleet: FleetArgs, settings: Settings) -> dict[str, Any]:
    """The engine deployment's Serve options (the module's docstring says why each differs from Serve's)."""
    return dict(
        ray_actor_options={"num_cpus": fleet.cpus_per_replica, "num_gpus": fleet.gpus_per_replica},
        max_ongoing_requests=settings.max_queue + settings.max_batch_rows,
        max_queued_requests=max(1, settings.max_queue),
        graceful_shutdown_timeout_s=settings.request_timeout + 10, graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=5.0, health_check_timeout_s=30.0,
        **replicas(fleet),
    )


def replicas(fleet: FleetArgs) -> dict[str, Any]:
    """A fixed count, or Serve's autoscaler on ongoing requests per replica (queued + in flight)."""
    if fleet.min_replicas == fleet.max_replicas:
        return {"num_replicas": fleet.min_replicas}
    return {"autoscaling_config": {
        "min_replicas": fleet.min_replicas, "max_replicas": fleet.max_replicas, "initial_replicas": fleet.min_replicas,
        "target_ongoing_requests": fleet.target_queue_depth,
        "upscale_delay_s": fleet.upscale_delay_s, "downscale_delay_s": fleet.downscale_delay_s,
        # the window Serve averages the queue over: as long as the delay it acts after, within what
        # Serve accepts (longer than its 10 s metrics interval) and its default of 30 s
        "look_back_period_s": min(30.0, max(LOOK_BACK_MIN_S, fleet.upscale_delay_s)),
    }}

