"""Request and response bodies of the HTTP API (pydantic), and the one error shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model

from model import SAMPLERS

from .settings import Settings

SamplerName = Literal["ddpm", "ddim", "dpm-solver++"]
assert set(SamplerName.__args__) == set(SAMPLERS)
MAX_SEED = 2**63 - 1


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable kind, e.g. invalid_request, queue_full, deadline_exceeded")
    message: str = Field(description="what went wrong and what to do")
    field: str | None = Field(None, description="the request field at fault, if one is")


class ErrorBody(BaseModel):
    """Every error answer of this API has this shape."""

    error: ErrorDetail


def generate_request_model(settings: Settings) -> type[BaseModel]:
    """The /generate body with this server's limits in its schema (so /docs shows the real bounds).

    Unknown fields are rejected (422), so a typo such as "cfg" does not silently take the default.
    """
    return create_model(
        "GenerateRequest",
        __config__=ConfigDict(extra="forbid"),
        class_id=(StrictInt, Field(ge=0, description="class index, 0..num_classes-1 (see GET /classes)")),
        cfg_scale=(float | None, Field(None, ge=settings.min_cfg_scale, le=settings.max_cfg_scale,
                                       allow_inf_nan=False, description="guidance scale; 1 = no guidance")),
        steps=(StrictInt | None, Field(None, ge=1, le=settings.max_steps, description="denoising steps")),
        seed=(StrictInt | None, Field(None, ge=0, le=MAX_SEED, description="random when absent; image k of "
                                      "num_images uses seed + k")),
        sampler=(SamplerName | None, Field(None, description="ddpm (the paper's), ddim (eta 0) or dpm-solver++")),
        num_images=(StrictInt, Field(1, ge=1, le=settings.max_images, description="images; > 1 gives a grid")),
        format=(Literal["png", "jpeg", "webp"], Field("png", description="image encoding")),
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
    images: list[ImageOut]
    timings: dict[str, float] = Field(description="seconds per stage: queue, denoise, decode, encode, total")


class ClassOut(BaseModel):
    id: int
    name: str


class ClassesResponse(BaseModel):
    classes: list[ClassOut]
