"""Request and response bodies of the HTTP API (pydantic); the error shape is in server/http/errors.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from model import SAMPLERS
from model.cache import Cache
from model.samplers import check_interval

from ..service.job import ImageFormat
from ..service.requests import MAX_SEED
from .errors import UNKNOWN_FIELDS_SHOWN, ErrorDetail

SamplerName = Literal[SAMPLERS]  # the names model/samplers.py defines
# Every number is strict, as JSON APIs usually are: a JSON number, never a string that holds one; a float
# field takes an integer (4 is 4.0), an integer field no float (2.0 is refused).
Number = Annotated[float, Strict()]
# [lo, hi] with 0 <= lo < hi <= 1 (a list, so that a wrong length is an error of the field, not of an item)
GuidanceInterval = Annotated[list[Number], Field(min_length=2, max_length=2), AfterValidator(check_interval)]


def _check_cache(value: Any) -> Any:
    Cache.parse(value)  # a ValueError naming what would do; the door makes the Cache
    return value


# "off", a preset's name or {method, every, order, warmup} (one type, so that an error names the field alone)
CacheSetting = Annotated[Any, AfterValidator(_check_cache)]


class StrictBody(BaseModel):
    """A request body: unknown fields are refused (422), so that a typo does not silently take a default."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _many_unknown_fields(cls, data: object) -> object:
        """A body of many unknown keys is refused with one error, before pydantic builds one per key (5,500
        keys cost ~30 ms of the event loop); a few are left to pydantic, which also reports the other
        fields' problems."""
        if isinstance(data, dict) and len(data) > UNKNOWN_FIELDS_SHOWN:
            unknown = [k for k in data if k not in cls.model_fields]
            if len(unknown) > UNKNOWN_FIELDS_SHOWN:
                raise PydanticCustomError("unknown_fields", "{count} unknown fields",
                                          {"count": len(unknown), "first": unknown[:UNKNOWN_FIELDS_SHOWN]})
        return data


class GenerateRequest(StrictBody):
    """The /generate body. Unknown fields are rejected (422), so a typo such as "cfg" does not silently take
    the default. What depends on this server (--max-steps, --max-images, the cfg_scale range) and on its
    model (class_id's maximum) is checked at the door (server/service/requests.py) and written into the
    OpenAPI schema once the model is loaded (server/http/docs.py), so /docs shows the real bounds."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["class_id"]}, {"required": ["class_name"]}]})

    class_id: StrictInt | None = Field(None, ge=0, description="class index, 0..num_classes-1 (see GET /classes); "
                                       "give class_id or class_name")
    class_name: StrictStr | None = Field(None, min_length=1, max_length=200, description="a class by name, instead "
                                         "of class_id: any of its names, case-insensitive, or a prefix only one "
                                         "class has (e.g. \"ankle\")")
    cfg_scale: Number | None = Field(None, ge=1.0, allow_inf_nan=False, description="guidance scale; 1 = no guidance")
    steps: StrictInt | None = Field(None, ge=1, le=1000, description="denoising steps")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="random (below 2^53) when absent; image k "
                                   "of num_images uses seed + k")
    sampler: SamplerName | None = Field(None, description="ddpm (the paper's), ddim (eta 0) or dpm-solver++")
    guidance_interval: GuidanceInterval | None = Field(None, description="[lo, hi], 0 <= lo < hi <= 1: guide only "
                                                       "the steps whose timestep t has lo <= t/999 <= hi (fewer "
                                                       "forward rows); [0, 1] guides every step")
    cache: CacheSetting | None = Field(None, json_schema_extra={"anyOf": [{"type": "string"}, {"type": "object"}]},
                                       description="step cache: \"off\" (the network at every "
                                       "step), a preset (see GET /info), or {\"method\": \"reuse\" | \"taylor\" | "
                                       "\"taylor-features\", \"every\": N, \"order\": 1 | 2, \"warmup\": W, "
                                       "\"guided_every\": M, \"guided_warmup\": V}: the network runs at one step in "
                                       "N, the others reuse or forecast its output or its final features (fewer "
                                       "forward rows); absent: the model's default (GET /info)")
    num_images: StrictInt = Field(1, ge=1, description="images; > 1 gives a grid")
    format: ImageFormat = Field("png", description="image encoding; when absent, an Accept: image/jpeg or "
                                "image/webp header picks it")
    previews: StrictBool = Field(False, description="with Accept: text/event-stream, also send `preview` events: "
                                 "small images of the predicted clean image while it forms")


class JobRequest(GenerateRequest):
    """The POST /jobs body: a GenerateRequest plus a webhook and a client tag."""

    webhook_url: StrictStr | None = Field(None, max_length=2048, description="POSTed the job's status JSON when it "
                                          "ends (signed; needs --webhook-secret and a host in --webhook-allow-hosts)")
    tag: StrictStr | None = Field(None, max_length=256, description="any client text, echoed in the job's status, "
                                  "result metadata and webhook")


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
    cache: str | dict[str, Any] = Field(description="the step cache: \"off\", a preset's name or its parameters")
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
    cache: str | dict[str, Any] = Field(description="the step cache: \"off\", a preset's name or its parameters")
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


class DatasetRequest(StrictBody):
    """The POST /datasets body: which classes, how many images of each, the /generate sampling settings,
    a base seed (image k of class c has seed + c x 1,000,000 + k), and the shards' format and size."""

    classes: Literal["all"] | Annotated[list[StrictInt | StrictStr], Field(min_length=1, max_length=1000)] = Field(
        description="\"all\", or class ids and names (as class_name takes them)")
    per_class: StrictInt = Field(ge=1, le=1_000_000, description="images of each class")
    sampler: SamplerName | None = Field(None, description="as in /generate; the model's default when absent")
    steps: StrictInt | None = Field(None, ge=1, le=1000, description="as in /generate")
    cfg_scale: Number | None = Field(None, ge=1.0, allow_inf_nan=False, description="as in /generate")
    guidance_interval: GuidanceInterval | None = Field(None, description="as in /generate")
    cache: CacheSetting | None = Field(None, json_schema_extra={"anyOf": [{"type": "string"}, {"type": "object"}]},
                                       description="as in /generate")
    seed: StrictInt | None = Field(None, ge=0, le=2**52, description="the base seed (random when absent): image k "
                                   "of class c has seed + c x 1000000 + k, so /generate can make it again alone")
    format: Literal["webdataset", "npz"] = Field("webdataset", description="webdataset: tar shards of {key}.png + "
                                                 "{key}.json; npz: arr_0 uint8 (N, H, W, 3) as the ADM evaluation "
                                                 "suite reads it, arr_1 the class ids")
    shard_size: StrictInt = Field(1000, ge=1, le=5000, description="images per shard (a shard is assembled in "
                                  "memory before it is written)")
    tag: StrictStr | None = Field(None, max_length=256, description="any client text, echoed in the status")
    webhook_url: StrictStr | None = Field(None, max_length=2048, description="POSTed the dataset's status JSON "
                                          "when it ends, signed as for jobs (the operator must allow its host)")
    evaluate: StrictBool = Field(False, description="once every image is made, evaluate them into the status and "
                                 "manifest: for the embedded Fashion-MNIST model, class agreement and feature-FID "
                                 "against its test set by the project's classifier; for any other model, every "
                                 "image in the one .npz the ADM evaluation suite reads (GET /datasets/{id}/adm.npz)")
