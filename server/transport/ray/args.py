"""The arguments of the Ray Serve application (`server.ray_app:build`): the dit-serve settings by their
names, plus the fleet's. One pydantic model with `extra="forbid"`, because Ray's own config schema takes
any key under `args`: a misspelled argument fails here, with its name, instead of being ignored.

    serve run server.ray_app:build model=weights/fashion_dit.safetensors min_replicas=2 max_replicas=2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ...settings import Settings

# Settings that belong to the single-server process, not to a Ray deployment: Serve's HTTP proxy owns the
# address and port (`http_options` in the Serve config), and an engine replica is its own process already.
NOT_ON_RAY = ("host", "port", "probe_port", "engine", "frontend_nice", "frontend_sched_idle")


class FleetArgs(BaseModel):
    """How many engine replicas, when to add or remove one, and what each one reserves."""

    model_config = ConfigDict(extra="forbid")

    frontend_replicas: int = Field(1, ge=1, description="front-end replicas (HTTP, jobs, encoding); more than one "
                                   "needs a job store they share: job_store=postgresql+psycopg://...")
    min_replicas: int = Field(1, ge=1, description="engine replicas at least (each loads the model once)")
    max_replicas: int = Field(1, ge=1, description="engine replicas at most; equal to min_replicas = a fixed count")
    target_queue_depth: float = Field(
        8, gt=0, description="requests queued plus in flight per engine replica that the autoscaler aims at")
    upscale_delay_s: float = Field(30.0, ge=0, description="seconds the queue must stay above target before a "
                                   "replica is added")
    downscale_delay_s: float = Field(300.0, ge=0, description="seconds the queue must stay below target before a "
                                     "replica is removed (it finishes what it admitted first)")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs each engine replica reserves (1 on GPU clusters)")
    cpus_per_replica: float = Field(1, ge=0, description="CPUs each engine replica reserves")

    @model_validator(mode="after")
    def _check(self) -> FleetArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


def _settings_fields() -> dict[str, Any]:
    """The dit-serve settings as they are (types, defaults, checks, `a,b` lists from `serve run`'s text)."""
    return {name: (field.annotation, field) for name, field in Settings.model_fields.items()
            if name not in NOT_ON_RAY}


AppArgs = create_model("AppArgs", __base__=FleetArgs, **_settings_fields())
AppArgs.__doc__ = "The builder's arguments: the dit-serve settings by name (see Settings) and the fleet's."


def parse_args(args: dict[str, Any]) -> tuple[FleetArgs, Settings]:
    """Validate the builder's arguments; raise ValueError naming each bad one and what is accepted."""
    try:
        parsed = AppArgs.model_validate(args)
    except ValidationError as e:
        raise ValueError(_describe(e)) from None
    given = {name: value for name, value in parsed.model_dump(exclude_unset=True).items()
             if name in Settings.model_fields}
    for name in ("model", "vae", "api_keys_file", "data_dir"):  # relative to where the builder runs (serve run's)
        if isinstance(given.get(name), Path):
            given[name] = given[name].resolve()
    try:
        settings = Settings(**given)
    except ValidationError as e:
        raise ValueError(_describe(e)) from None
    if parsed.frontend_replicas > 1 and not shared_store(settings):
        raise ValueError("invalid arguments for server.ray_app:build:\n  frontend_replicas="
                         f"{parsed.frontend_replicas} needs a job store every front-end reaches: "
                         "job_store=postgresql+psycopg://user:password@host/db (SQLite is one file on one host)")
    return FleetArgs(**{name: getattr(parsed, name) for name in FleetArgs.model_fields}), settings


def shared_store(settings: Settings) -> bool:
    """Whether the job store is a database server (which front-ends on several hosts can share)."""
    return settings.job_store is not None and not settings.job_store.startswith("sqlite")


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        name = ".".join(map(str, err["loc"])) or "arguments"
        if err["type"] == "extra_forbidden" and name in NOT_ON_RAY:
            lines.append(f"  {name}: not an argument on Ray (the address and port are Serve's http_options; "
                         "each engine replica is its own process)")
        elif err["type"] == "extra_forbidden":
            lines.append(f"  {name}: unknown argument (the dit-serve settings by their names and "
                         f"{', '.join(FleetArgs.model_fields)} are accepted)")
        elif not err["loc"]:  # a check across arguments
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        else:
            field = Settings.model_fields.get(str(err["loc"][0]))
            got = "" if field is not None and field.repr is False else f" (got {err['input']!r})"  # secrets unsaid
            lines.append(f"  {name}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "invalid arguments for server.ray_app:build:\n" + "\n".join(lines)
