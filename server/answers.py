"""From a validated request body to its HTTP answer: the body becomes a job (the model's defaults
resolved, the class named, the seeds chosen), the job is submitted and awaited, and its result is
answered as an image, JSON, or a stream of server-sent progress events ending with the result."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from model.samplers import SettingError

from .class_names import ClassNameError, class_index
from .contracts import (
    Cancelled,
    DeadlineExceeded,
    FinishReason,
    GenerationResult,
    GenerationSpec,
    Job,
    NotReady,
    OutputSpec,
    SchedulerError,
)
from .encoding import MEDIA_TYPES, encode, grid, parameters
from .errors import ApiError, class_choice_problems
from .schemas import image_seeds
from .service import Service

PROGRESS_POLL_SECONDS = 0.05  # how often a stream looks at its job's progress (the step loop never waits)
ACCEPTED_IMAGES = {media: fmt for fmt, media in MEDIA_TYPES.items()}  # what an Accept header may ask for


def not_ready(service: Service) -> ApiError:
    return ApiError.from_scheduler(NotReady(f"not ready: {service.status}"))


def require_ready(service: Service) -> Service:
    if not service.ready:
        raise not_ready(service)
    return service


def resolve_class(service: Service, body) -> int:
    """The class id a body names, by `class_id` or `class_name` (exactly one of them)."""
    problems = class_choice_problems({"class_id": body.class_id, "class_name": body.class_name})
    if problems:
        raise ApiError.invalid(problems)
    num_classes = service.model.num_classes
    if body.class_id is not None:
        if body.class_id >= num_classes:
            raise ApiError.invalid([("class_id", f"class_id must be below {num_classes} (see GET /classes)")])
        return body.class_id
    try:
        return class_index(tuple(service.model.info.class_names)).resolve(body.class_name)
    except ClassNameError as e:
        raise ApiError.invalid([("class_name", str(e))]) from e


def image_format(body, accept: str) -> str:
    """`format` when the body gives one; else the image type the Accept header prefers; else PNG."""
    if "format" in body.model_fields_set:
        return body.format
    best, best_q = "png", 0.0
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = next((float(p[2:]) for p in params if p.startswith("q=") and _is_number(p[2:])), 1.0)
        if media.lower() in ACCEPTED_IMAGES and q > best_q:
            best, best_q = ACCEPTED_IMAGES[media.lower()], q
    return best


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def make_job(service: Service, body, request: Request, *, separate: bool, timeout: float,
             tag: str | None = None) -> Job:
    """A scheduler job for a validated request body; omitted fields take the model's defaults."""
    svc = require_ready(service)
    info = svc.model.info
    class_id = resolve_class(svc, body)
    try:
        s = info.defaults.resolve(sampler=body.sampler, steps=body.steps, cfg_scale=body.cfg_scale,
                                  guidance_interval=body.guidance_interval, max_steps=svc.settings.max_steps)
    except SettingError as e:
        raise ApiError.invalid([(e.field, str(e))]) from e
    spec = GenerationSpec(class_id=class_id, cfg_scale=s.cfg_scale, steps=s.steps, sampler=s.sampler,
                          guidance_interval=s.guidance_interval, previews=body.previews,
                          seeds=image_seeds(body.seed, body.num_images))
    params = parameters(info, class_id, s)
    if tag is not None:
        params["tag"] = tag
    output = OutputSpec(format=image_format(body, request.headers.get("accept", "")), separate=separate,
                        metadata=params)
    return Job(spec, output, deadline=time.monotonic() + timeout, owner=getattr(request.state, "owner", None))


def submit(service: Service, job: Job) -> None:
    try:
        service.submit(job)
    except SchedulerError as e:
        raise ApiError.from_scheduler(e) from e


def watch(job: Job) -> asyncio.Future:
    """The job's future on this event loop. Its outcome counts as retrieved even when nobody awaits it
    (a client gone, a deadline passed), so asyncio never logs "Future exception was never retrieved"."""
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


async def wait(job: Job, request: Request) -> GenerationResult:
    """The job's result; cancels the job when the client disconnects or the deadline passes."""
    result = watch(job)
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=max(0.0, job.deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    try:
        if result in done:
            return result.result()
        if gone in done:
            job.cancel(FinishReason.CANCELLED)
            raise Cancelled("the client went away")
        job.cancel(FinishReason.TIMED_OUT)
        raise DeadlineExceeded(f"no result within the request timeout ({job.spec.steps} steps); ask for fewer "
                               "steps or images, or submit it as a job (POST /jobs)")
    except SchedulerError as e:
        raise ApiError.from_scheduler(e) from e


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next message is the end)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


def json_body(job: Job, result: GenerationResult) -> dict:
    images = [{"seed": im.seeds[0], "media_type": im.media_type, "data": base64.b64encode(im.data).decode()}
              for im in result.images]
    return dict(job.output.metadata, images=images, timings=result.timings, replica=result.replica)


# The headers of an answer, in the order `headers` gives their values (CORS exposes them: server/api.py).
ANSWER_HEADERS = ("X-Seeds", "X-Class-Id", "X-Class-Name", "X-Steps", "X-Cfg-Scale", "X-Sampler",
                  "X-Guidance-Interval", "X-Replica", "Server-Timing")


def headers(job: Job, result: GenerationResult) -> dict[str, str]:
    spec = job.spec
    values = (",".join(map(str, spec.seeds)), str(spec.class_id), quote(job.output.metadata["class_name"]),
              str(spec.steps), f"{spec.cfg_scale:g}", spec.sampler, "{:g},{:g}".format(*spec.guidance_interval),
              result.replica,
              ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in result.timings.items()))
    return dict(zip(ANSWER_HEADERS, values, strict=True))


def render(service: Service, job: Job, result: GenerationResult) -> Response:
    """The answer for a finished job: JSON (separate images) or the image / grid itself."""
    service.metrics.images.inc(job.spec.num_images)
    if job.output.separate:
        return JSONResponse(json_body(job, result), headers=headers(job, result))
    image = result.images[0]
    return Response(image.data, media_type=image.media_type, headers=headers(job, result))


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def preview_body(job: Job, step: int, pixels) -> dict:
    """A `preview` event: the request's images at this step as one small PNG grid, base64."""
    image = grid(pixels)  # (h, w, 3)
    png = encode(image[None], job.spec.seeds, OutputSpec(format="png"))[0]
    return {"step": step, "steps": job.spec.steps, "media_type": png.media_type,
            "data": base64.b64encode(png.data).decode(), "width": image.shape[1], "height": image.shape[0]}


def progress(job: Job) -> dict:
    """A job's progress as its stream reports it: {step, steps, status}, and queue_position while queued."""
    out = {"step": job.progress, "steps": job.spec.steps, "status": job.status}
    position = job.queue_position
    if out["status"] == "queued" and position is not None:
        out["queue_position"] = position
    return out


async def progress_events(service: Service, job: Job) -> AsyncIterator[str]:
    """Server-sent events: `progress` {step, steps, status[, queue_position]} whenever one changes, then
    `result` (the JSON answer) or `error` (the error shape). If the client goes away, the job is cancelled."""
    result = watch(job)
    last, shown = None, None
    try:
        while not result.done():
            now = progress(job)
            if now != last:
                last = now
                yield _event("progress", now)
            preview = job.preview
            if preview is not None and preview is not shown:
                shown = preview
                yield _event("preview", preview_body(job, *preview))
            if time.monotonic() > job.deadline:
                job.cancel(FinishReason.TIMED_OUT)
                raise DeadlineExceeded("no result within the request timeout")
            await asyncio.wait({result}, timeout=PROGRESS_POLL_SECONDS)
        outcome = result.result()  # raises the job's error, if it failed
        service.metrics.images.inc(job.spec.num_images)
        yield _event("progress", {"step": job.spec.steps, "steps": job.spec.steps, "status": "done"})
        yield _event("result", json_body(job, outcome))
    except SchedulerError as e:
        yield _event("error", ApiError.from_scheduler(e).body())
    finally:
        if not job.future.done():
            job.cancel(FinishReason.CANCELLED)  # the stream ended early: the client went away
