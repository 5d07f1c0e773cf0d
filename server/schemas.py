"""Request and response bodies of the HTTP API (pydantic); the error shape is in server/errors.py."""

from __future__ import annotations

import random
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, create_model

from model import SAMPLERS
from model.samplers import check_interval

from .contracts import ImageFormat
from .errors import ErrorDetail
from .settings import Settings

SamplerName = Literal[SAMPLERS]  # the names model/samplers.py defines
MAX_SEED = 2**63 - 1
MAX_SERVER_SEED = 2**53 - 1  # seeds the server picks stay exact in a JavaScript number (a double)
# [lo, hi] with 0 <= lo < hi <= 1 (a list, so that a wrong length is an error of the field, not of an item)
GuidanceInterval = Annotated[list[float], Field(min_length=2, max_length=2), AfterValidator(check_interval)]


def image_seeds(seed: int | None, count: int) -> tuple[int, ...]:
    """The seeds of a request's `count` images: seed, seed + 1, ... (wrapping past MAX_SEED). Without a
    seed, a random one that keeps all of them below 2^53, so that a JavaScript client can repeat it."""
    base = seed if seed is not None else random.randrange(MAX_SERVER_SEED + 2 - count)
    return tuple((base + k) % (MAX_SEED + 1) for k in range(count))


def generate_request_model(settings: Settings) -> type[BaseModel]:
    """The /generate body with this server's limits in its schema (so /docs shows the real bounds).

    Unknown fields are rejected (422), so a typo such as "cfg" does not silently take the default.
    `class_id`'s maximum depends on the model, which loads after this is built: the app writes it
    into the OpenAPI schema once the model is ready (server/api.py).
    """
    return create_model(
        "GenerateRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={
            "oneOf": [{"required": ["class_id"]}, {"required": ["class_name"]}]}),
        class_id=(StrictInt | None, Field(None, ge=0, description="class index, 0..num_classes-1 (see GET "
                                          "/classes); give class_id or class_name")),
        class_name=(StrictStr | None, Field(None, min_length=1, max_length=200, description="a class by name, "
                                            "instead of class_id: any of its names, case-insensitive, or a "
                                            "prefix only one class has (e.g. \"ankle\")")),
        cfg_scale=(float | None, Field(None, ge=settings.min_cfg_scale, le=settings.max_cfg_scale,
                                       allow_inf_nan=False, description="guidance scale; 1 = no guidance")),
        steps=(StrictInt | None, Field(None, ge=1, le=settings.max_steps, description="denoising steps")),
        seed=(StrictInt | None, Field(None, ge=0, le=MAX_SEED, description="random (below 2^53) when absent; "
                                      "image k of num_images uses seed + k")),
        sampler=(SamplerName | None, Field(None, description="ddpm (the paper's), ddim (eta 0) or dpm-solver++")),
        guidance_interval=(GuidanceInterval | None, Field(None, description="[lo, hi], 0 <= lo < hi <= 1: guide "
                                                          "only the steps whose timestep t has lo <= t/999 <= hi "
                                                          "(fewer forward rows); [0, 1] guides every step")),
        num_images=(StrictInt, Field(1, ge=1, le=settings.max_images, description="images; > 1 gives a grid")),
        format=(ImageFormat, Field("png", description="image encoding; when absent, an "
                                                      "Accept: image/jpeg or image/webp header picks it")),
        previews=(StrictBool, Field(False, description="with Accept: text/event-stream, also send `preview` "
                                    "events: small images of the predicted clean image while it forms")),
    )


def job_request_model(generate_request: type[BaseModel]) -> type[BaseModel]:
    """The POST /jobs body: a GenerateRequest plus a webhook and a client tag."""
    return create_model(
        "JobRequest", __base__=generate_request,
        webhook_url=(StrictStr | None, Field(None, max_length=2048, description="POSTed the job's status JSON "
                                             "when it ends (signed; needs --webhook-secret and a host in "
                                             "--webhook-allow-hosts)")),
        tag=(StrictStr | None, Field(None, max_length=256, description="any client text, echoed in the job's "
                                     "status, result metadata and webhook")),
    )


class ImageOut(BaseModel):
    seed: int
    media_type: str
    data: str = Field(description="base64 of the encoded image")


class GenerateResponse(BaseModel):
    """The answer to `Accept: application/json`."""

    model: str
    class_id: int
    class_name: str
    cfg_scale: float
    steps: int
    sampler: str
    guidance_interval: tuple[float, float] = Field(description="[lo, hi]: the steps with lo <= t/999 <= hi "
                                                   "were guided")
    tag: str | None = Field(None, description="the job's tag (async jobs submitted with one)")
    images: list[ImageOut]
    timings: dict[str, float] = Field(description="seconds per stage: queue, denoise, decode, encode, total")
    replica: str = Field(description="the engine that generated the images (as the X-Replica header): host:pid, "
                         "or the Ray Serve replica")


class JobStatus(BaseModel):
    """GET /jobs/{id}; also the body of the job's webhook."""

    id: str
    status: Literal["queued", "running", "encoding", "done", "failed", "cancelled", "timed_out"]
    step: int = Field(description="denoising steps done (by the job's slowest image)")
    steps: int
    queue_position: int | None = Field(None, description="while queued: 1 = next to be admitted")
    num_images: int
    seeds: list[int]
    class_id: int
    class_name: str
    tag: str | None = None
    created: float = Field(description="submission time, unix seconds")
    status_url: str
    result_url: str
    error: ErrorDetail | None = Field(None, description="why it failed, was cancelled or timed out")


class JobList(BaseModel):
    jobs: list[JobStatus] = Field(description="the caller's jobs, newest first")


class ClassOut(BaseModel):
    id: int
    name: str


class ClassesResponse(BaseModel):
    classes: list[ClassOut]
