"""Scale-out on Ray Serve: `serve run server.ray_app:build key=value ...` or a Serve config file
(deploy/ray/serve.yaml). Two deployments:

    Serve's HTTP proxies -> Frontend (frontend_replicas: HTTP, validation, jobs, encoding, /metrics)
                              -> Engine replicas (min..max, one device each: engine core + model runner)

The front-end is the dit-serve HTTP app (the same routes, validation, auth, jobs, encoding and metrics
as a single server) with a fleet of engine replicas behind it instead of one engine. It holds no model
and no tensor; it validates, relays and encodes. One front-end replica by default; more than one need a
job store on a database server (job_store=postgresql+psycopg://...), which they share: a job made
through one is polled, fetched and cancelled through any other (the store has its status, progress,
result and a cancel flag its holder reads), and a killed front-end's jobs are taken over by the others
when its leases run out (server/service/job_store.py). Each front-end sees the whole fleet's load and
per-key counts in the engine replicas' reports, which the store relays (server/transport/ray/client.py).

The arguments are the dit-serve settings by name plus the fleet's (server/transport/ray/args.py). Ray's
defaults changed here, and why:
  - max_ongoing_requests: Serve would let 5 requests into a replica at a time, starving its batcher;
    an engine takes its queue (max_queue) plus what can run (max_batch_rows) and refuses the rest
    itself (429).
  - max_queued_requests: when every replica is full, at most max_queue requests wait at the router (each
    until its deadline), then 429 queue_full (instead of an unbounded queue in the front-end).
  - the front-end's limits: room for every request the engines can hold, plus polls and /metrics.
  - autoscaling on Serve's ongoing requests per replica, which for an engine is its queued plus
    in-flight requests: target_ongoing_requests = target_queue_depth.
  - graceful_shutdown_timeout_s > request_timeout: a replica being removed finishes what it admitted.
  - health checks every 5 s call the engine's own check (device usable, engine thread alive).
  - the engine's request router: a dataset shard's chunks go to one replica, and new shards to the
    replica making the fewest (server/transport/ray/router.py); other requests as Serve's default.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .http.app import create_app
from .logs import setup_logging
from .settings import Settings
from .transport.ray.args import FleetArgs, parse_args, shared_store
from .transport.ray.client import FleetEngine
from .transport.ray.messages import Report
from .transport.ray.replica import EngineReplica
from .transport.ray.router import AffinityRouter

FRONTEND, ENGINE = "Frontend", "Engine"
LOOK_BACK_MIN_S = 11.0
FRONTEND_EXTRA_ONGOING = 1024  # HTTP requests beyond what the engines hold: job polls, /metrics, refusals


def build(args: dict[str, Any]) -> Application:
    fleet, settings = parse_args(args)
    engine = serve.deployment(EngineReplica, name=ENGINE).options(**engine_options(fleet, settings))
    frontend = serve.deployment(Frontend, name=FRONTEND).options(**frontend_options(fleet, settings))
    return frontend.bind(settings, engine.bind(settings, FRONTEND), ENGINE)


def frontend_options(fleet: FleetArgs, settings: Settings) -> dict[str, Any]:
    """A front-end holds the requests it relays for their whole life (a stream, a wait), and the replicas'
    reports queue behind them: room for all that the engines can hold, and more for polls."""
    engines = fleet.max_replicas * (settings.max_queue + settings.max_batch_rows) + settings.max_queue
    return dict(num_replicas=fleet.frontend_replicas, ray_actor_options={"num_cpus": 0},
                max_ongoing_requests=engines + FRONTEND_EXTRA_ONGOING, max_queued_requests=FRONTEND_EXTRA_ONGOING,
                graceful_shutdown_timeout_s=settings.drain_timeout)


def engine_options(fleet: FleetArgs, settings: Settings) -> dict[str, Any]:
    """The engine deployment's Serve options (the module's docstring says why each differs from Serve's)."""
    return dict(
        ray_actor_options={"num_cpus": fleet.cpus_per_replica, "num_gpus": fleet.gpus_per_replica},
        max_ongoing_requests=settings.max_queue + settings.max_batch_rows,
        max_queued_requests=max(1, settings.max_queue),
        graceful_shutdown_timeout_s=settings.drain_timeout, graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=5.0, health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(request_router_class=AffinityRouter),
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
        # the window Serve averages the queue over: as long as the delay it acts after, between its
        # default of 30 s and its 10 s metrics interval (Serve warns at or below it, and will refuse)
        "look_back_period_s": min(30.0, max(LOOK_BACK_MIN_S, fleet.upscale_delay_s)),
    }}


@serve.ingress()
class Frontend:
    def __init__(self, settings: Settings, engines, engine_name: str):
        setup_logging(settings.log_level, settings.log_format)
        self.settings, self.engines = settings, engines  # engines: the engine deployment's handle
        self.app_name, self.engine_name = serve.get_replica_context().app_name, engine_name
        self.fleet: FleetEngine | None = None

    def __serve_build_asgi_app__(self):
        def engine(service) -> FleetEngine:
            self.fleet = FleetEngine(self.settings, service, self.engines, self.app_name, self.engine_name)
            return self.fleet

        shared = shared_store(self.settings)
        app = create_app(self.settings, engine, shared_store=shared)
        if shared:  # other front-ends may share it: the replicas' reports and each one's metrics go through it
            self.fleet.store, self.fleet.registry = app.state.service.jobs, app.state.service.metrics.registry
        return app

    def process(self) -> int:
        """This front-end's process id (tests kill it by that)."""
        return os.getpid()

    async def report(self, report: Report) -> None:
        """An engine replica's load and metrics (every second, through a deployment handle)."""
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.on_report, report)  # a write to the store, when shared
