"""The HTTP layer: validates requests, hands jobs to the scheduler, turns results into responses.

No tensors here, and nothing that blocks the event loop: generation runs on the scheduler's thread,
encoding on its pool; this layer only waits on futures.
"""

import asyncio
import base64
import logging
import random
import time
from contextlib import asynccontextmanager
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from model import SAMPLERS

from .contracts import (
    Cancelled,
    DeadlineExceeded,
    GenerationResult,
    GenerationSpec,
    Job,
    OutputSpec,
    SchedulerError,
)
from .schemas import MAX_SEED, ClassesResponse, ErrorBody, GenerateResponse, generate_request_model
from .service import Service
from .settings import Settings

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after


def error_response(status: int, code: str, message: str, field: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


ERROR_RESPONSES = {s: {"model": ErrorBody, "description": d} for s, d in {
    422: "invalid request (the error names the field)", 429: "queue full (see Retry-After)",
    503: "not ready or shutting down (see Retry-After)", 504: "deadline passed", 500: "generation failed",
}.items()}


def create_app(settings: Settings) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()  # loads and warms up on its own thread; /readyz says when it is done
        yield
        await asyncio.to_thread(service.shutdown)

    app = FastAPI(title="dit-serve", version="0.1.0", lifespan=lifespan,
                  description="Class-conditional image generation with Diffusion Transformers (DiT).")
    app.state.service = service
    app.add_middleware(GenerateMetrics, metrics=service.metrics)
    GenerateRequest = generate_request_model(settings)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.code, e.message, e.field, e.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}; the fields are those of GenerateRequest in /docs"
        elif first.get("type") in ("json_invalid", "model_attributes_type"):
            message = "the body must be a JSON object, e.g. {\"class_id\": 3}"
        return error_response(422, "invalid_request", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, "http_error", str(e.detail))

    def require_ready() -> Service:
        if not service.ready:
            raise ApiError(503, "not_ready", f"not ready: {service.status}", retry_after=5)
        return service

    @app.get("/healthz", summary="liveness: the process answers")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", summary="readiness: 200 once the model is loaded and warmed up",
             responses={503: {"model": ErrorBody}})
    async def readyz():
        if not service.ready:
            return error_response(503, "not_ready", f"not ready: {service.status}", retry_after=5)
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/classes", response_model=ClassesResponse, summary="class ids and names of the loaded model")
    async def classes():
        info = require_ready().runner.info
        return {"classes": [{"id": i, "name": n} for i, n in enumerate(info.class_names)]}

    @app.get("/info", summary="model, resolution, limits, defaults and batching policy")
    async def info():
        svc = require_ready()
        r, d = svc.runner, svc.runner.info.defaults
        return {
            "model": r.info.name, "space": r.info.space, "image_size": r.info.image_size,
            "num_classes": r.num_classes, "device": str(r.device), "dtype": str(r.dtype).removeprefix("torch."),
            "policy": settings.policy, "max_batch_rows": settings.max_batch_rows, "samplers": list(SAMPLERS),
            "defaults": {"sampler": d.sampler, "steps": d.steps, "cfg_scale": d.cfg_scale},
            "limits": {"max_steps": settings.max_steps, "max_images": settings.max_images,
                       "min_cfg_scale": settings.min_cfg_scale, "max_cfg_scale": settings.max_cfg_scale,
                       "max_queue": settings.max_queue, "request_timeout": settings.request_timeout},
        }

    @app.post(
        "/generate", summary="generate an image (a grid for num_images > 1)", response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {},
                                     "application/json": {"schema": GenerateResponse.model_json_schema()}},
                         "description": "the image, or with Accept: application/json base64 images + metadata"},
                   **ERROR_RESPONSES},
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:  # type: ignore[valid-type]
        svc = require_ready()
        info = svc.runner.info
        if body.class_id >= svc.runner.num_classes:
            raise ApiError(422, "invalid_request", f"class_id must be below {svc.runner.num_classes} "
                           "(see GET /classes)", "class_id")
        d = info.defaults
        base_seed = body.seed if body.seed is not None else random.randrange(MAX_SEED)
        seeds = tuple((base_seed + k) % (MAX_SEED + 1) for k in range(body.num_images))
        spec = GenerationSpec(
            class_id=body.class_id, cfg_scale=d.cfg_scale if body.cfg_scale is None else body.cfg_scale,
            steps=body.steps or min(d.steps, settings.max_steps), sampler=body.sampler or d.sampler, seeds=seeds,
        )
        params = {"model": info.name, "class_id": spec.class_id, "class_name": info.class_names[spec.class_id],
                  "cfg_scale": spec.cfg_scale, "steps": spec.steps, "sampler": spec.sampler}
        want_json = "application/json" in request.headers.get("accept", "")
        job = Job(spec, OutputSpec(format=body.format, separate=want_json, metadata=params),
                  deadline=time.monotonic() + settings.request_timeout)
        try:
            svc.scheduler.submit(job)
            result = await _wait(job, request)
        except SchedulerError as e:
            raise ApiError(e.status, e.code, str(e), retry_after=e.retry_after) from e
        svc.metrics.images.inc(spec.num_images)
        if want_json:
            images = [{"seed": im.seeds[0], "media_type": im.media_type, "data": base64.b64encode(im.data).decode()}
                      for im in result.images]
            return JSONResponse(dict(params, images=images, timings=result.timings),
                                headers=_headers(spec, params, result))
        image = result.images[0]
        return Response(image.data, media_type=image.media_type, headers=_headers(spec, params, result))

    async def _wait(job: Job, request: Request) -> GenerationResult:
        """The job's result; cancels it when the client disconnects or the deadline passes."""
        result = asyncio.wrap_future(job.future)
        gone = asyncio.create_task(_disconnected(request))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=max(0.0, job.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result in done:
            return result.result()
        job.cancel()
        if gone in done:
            raise Cancelled("the client went away")
        raise DeadlineExceeded(f"no result within the {settings.request_timeout:g} s request timeout")

    return app


class GenerateMetrics:
    """ASGI middleware: status and duration of every /generate answer, validation errors included."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/generate":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(code=str(status)).inc()
            self.metrics.request_duration.observe(time.monotonic() - t0)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _headers(spec: GenerationSpec, params: dict, result: GenerationResult) -> dict[str, str]:
    timing = ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in result.timings.items())
    return {
        "X-Seeds": ",".join(map(str, spec.seeds)), "X-Class-Id": str(spec.class_id),
        "X-Class-Name": quote(params["class_name"]), "X-Steps": str(spec.steps),
        "X-Cfg-Scale": f"{spec.cfg_scale:g}", "X-Sampler": spec.sampler, "Server-Timing": timing,
    }
