"""`python -m server` / `dit-serve`: parse settings (flags over DIT_* env vars) and run uvicorn.

One uvicorn worker per GPU: the scheduler batches only the requests its own process sees, and each
worker would hold its own copy of the model, so several workers on one GPU would split the batches
and multiply the memory. Scale out with one server process per GPU behind a load balancer.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic_settings import CliApp

from .hygiene import JsonLogFormatter
from .settings import Settings


def main(argv: list[str] | None = None) -> None:
    settings = CliApp.run(Settings, cli_args=sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if settings.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    from .api import create_app  # after logging is set up

    app = create_app(settings)
    # uvicorn logs through the root handler (log_config=None); our RequestContext writes the access log.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, access_log=False, workers=1,
                            timeout_graceful_shutdown=settings.request_timeout)
    GracefulServer(config, on_exit=app.state.service.begin_shutdown).run()


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT turn readiness off and stop admitting at once, then let uvicorn stop accepting
    connections and wait (up to the request timeout) for the requests in flight."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
