"""The front-end deployment: the dit-serve HTTP app (the same routes, validation, auth, jobs, encoding
and metrics as a single server), with a fleet of engine replicas behind it instead of one engine.

One replica: the async jobs and the per-key quotas live in its memory, so that a job created through
one request can be polled, fetched and cancelled through any later one, whichever Serve proxy
(front door) it came in by. It holds no model and no tensor; it validates, relays and encodes.
"""

from __future__ import annotations

from ray import serve

from ..api import create_app
from ..logs import setup_logging
from ..settings import Settings
from .client import FleetEngine
from .messages import Report


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

        return create_app(self.settings, engine)

    def report(self, report: Report) -> None:
        """An engine replica's load and metrics (every second, through a deployment handle)."""
        if self.fleet is not None:
            self.fleet.on_report(report)
