"""`python -m server` / `dit-serve`: parse settings (flags over DIT_* env vars) and run uvicorn.

One uvicorn worker per GPU: the scheduler batches only the requests its own process sees, and each
worker would hold its own copy of the model, so several workers on one GPU would split the batches
and multiply the memory. Scale out on Ray Serve (server/ray_app.py): one engine replica per GPU behind
one front-end.

A server whose model cannot be loaded exits with status 1 (the reason is in the log) instead of
answering 503 forever: an orchestrator sees a failed process and reports it, or restarts it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any, get_args

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp, CliSettingsSource, SettingsError

from .logs import setup_logging
from .settings import DATA_DIR, Settings

log = logging.getLogger(__name__)

# What `--help` writes after a flag where the type alone ("float", "list[str]") would not say it.
METAVARS = {
    "arch": "PRESET", "device": "DEVICE", "host": "ADDRESS", "port": "PORT", "max_body_bytes": "BYTES",
    "graph_batch_sizes": "N,N,...", "api_keys": "KEY,KEY,...", "open_paths": "PATH,PATH,...",
    "cors_origins": "ORIGIN,ORIGIN,...", "body_timeout": "SECONDS", "header_timeout": "SECONDS",
    "request_timeout": "SECONDS", "job_timeout": "SECONDS", "job_ttl": "SECONDS", "min_cfg_scale": "SCALE",
    "max_cfg_scale": "SCALE", "webhook_secret": "SECRET", "webhook_allow_hosts": "HOST,HOST,...",
    "webhook_timeout": "SECONDS", "job_store": "URL", "probe_port": "PORT",
}
TYPE_METAVARS = {Path: "PATH", int: "N", float: "NUMBER", str: "TEXT"}


def metavar(name: str) -> str | None:
    """The placeholder after --NAME; None keeps pydantic-settings' own ({a,b,c} for choices)."""
    if name in METAVARS:
        return METAVARS[name]
    annotation = Settings.model_fields[name].annotation
    types = [t for t in (get_args(annotation) or (annotation,)) if t is not type(None)]  # X | None -> X
    return TYPE_METAVARS.get(types[0]) if len(types) == 1 else None


def show_default(value: Any) -> str:
    """A default as one would write it in the environment: `none`, `a,b`, `true`; the data directory as it
    is found on any machine."""
    if value == DATA_DIR:
        return "~/.local/share/dit-serve (or $XDG_DATA_HOME/dit-serve)"
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _add_argument(parser: argparse.ArgumentParser, *names: str, **kwargs: Any):
    """pydantic-settings' argument for a setting, with a placeholder that says what to write and its
    default written once (pydantic-settings appends its own after any the description gives)."""
    field = Settings.model_fields.get(kwargs.get("dest", ""))
    if field is not None:
        name = kwargs["dest"]
        if "metavar" in kwargs and (placeholder := metavar(name)):
            kwargs["metavar"] = placeholder
        env = Settings.model_config["env_prefix"] + name.upper()
        kwargs["help"] = f"{field.description} (default: {show_default(field.default)}) [env: {env}]".replace(
            "%", "%%")
    return parser.add_argument(*names, **kwargs)


def parse_settings(argv: list[str]) -> Settings:
    """Flags over DIT_* env vars over defaults; a bad value exits with status 2 (argparse's, for usage
    errors) and says which setting, instead of a traceback."""
    try:
        return CliApp.run(Settings, cli_args=argv,
                          cli_settings_source=CliSettingsSource(Settings, add_argument_method=_add_argument))
    except ValidationError as e:
        message = "invalid settings:\n" + "\n".join(map(_describe_error, e.errors()))
    except SettingsError as e:
        message = f"invalid settings: {e}"
    print(f"dit-serve: {message}", file=sys.stderr)
    sys.exit(2)


def _describe_error(err: dict) -> str:
    """`  --port / DIT_PORT: Input should be a valid integer (got 'abc')`; list items say which one."""
    if not err["loc"]:
        return f"  {err['msg']}"
    name, *item = err["loc"]
    where = f"--{str(name).replace('_', '-')} / {Settings.model_config['env_prefix']}{str(name).upper()}"
    if item:
        where += f" (item {int(item[0]) + 1})" if isinstance(item[0], int) else f" ({item[0]})"
    field = Settings.model_fields.get(str(name))
    got = "" if field is not None and field.repr is False else f" (got {err['input']!r})"  # secrets stay unsaid
    return f"  {where}: {err['msg'].removeprefix('Value error, ')}{got}"


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    setup_logging(settings.log_level, settings.log_format)
    from .http.app import create_app  # after logging is set up
    from .http.connections import ConnectionGuard
    from .service.job_store import StoreError

    try:
        app = create_app(settings)
    except StoreError as e:
        log.error("%s", e)
        print(f"dit-serve: {e}", file=sys.stderr)
        sys.exit(1)
    service = app.state.service
    if settings.probe_port is not None:  # before the front-end lowers its priority: the process keeps normal
        from .http.probes import Probes

        try:
            probes = Probes(settings.host, settings.probe_port)
        except OSError as e:
            print(f"dit-serve: {e}", file=sys.stderr)
            sys.exit(1)
        service.on_readiness = probes.publish
        log.info("probes (/healthz, /readyz) on http://%s:%d, process %d", settings.host, settings.probe_port,
                 probes.proc.pid)
    # uvicorn logs through the root handler (log_config=None); our RequestContext writes the access log.
    guard = ConnectionGuard(settings.header_timeout, settings.max_connections, service.metrics)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, access_log=False, workers=1, http=guard.protocol(),
                            timeout_graceful_shutdown=settings.request_timeout)
    server = GracefulServer(config, on_exit=service.begin_shutdown)
    failures: list[str] = []

    def stop(reason: str) -> None:  # from the loader thread; uvicorn checks should_exit every 0.1 s
        failures.append(reason)
        server.should_exit = True

    service.on_exit_failure = stop
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C's signal again once it has stopped: no traceback for that
        if not failures:
            sys.exit(128 + signal.SIGINT)
    if failures:
        log.error("exiting with status 1: the server could not start or lost its engine: %s", failures[0])
        sys.exit(1)


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT turn readiness off and stop admitting at once, then let uvicorn stop accepting
    connections and wait (up to the request timeout) for the requests in flight."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
