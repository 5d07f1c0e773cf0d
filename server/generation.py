"""Turning a validated request body into a scheduler job, and a job's result into an HTTP answer:
an image, JSON, or a stream of server-sent progress events ending with the result."""

import asyncio
import base64
import json
import random
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from model.samplers import plan

from .contracts import Cancelled, DeadlineExceeded, GenerationResult, GenerationSpec, Job, OutputSpec, SchedulerError
from .errors import ApiError
from .schemas import MAX_SEED
from .service import Service

PROGRESS_POLL_SECONDS = 0.05  # how often a stream looks at its job's progress (the step loop never waits)


def require_ready(service: Service) -> Service:
    if not service.ready:
        raise ApiError(503, "not_ready", f"not ready: {service.status}", retry_after=5)
    return service


def make_job(service: Service, body, *, separate: bool, timeout: float) -> Job:
    """A scheduler job for a validated GenerateRequest body; omitted fields take the model's defaults."""
    svc = require_ready(service)
    info, settings = svc.runner.info, svc.settings
    if body.class_id >= svc.runner.num_classes:
        raise ApiError(422, "invalid_request", f"class_id must be below {svc.runner.num_classes} (see GET /classes)",
                       "class_id")
    d = info.defaults
    try:  # the sampler's own limits (e.g. DPM-Solver++ cannot take 1000 steps)
        plan(body.sampler or d.sampler, body.steps or min(d.steps, settings.max_steps))
    except ValueError as e:
        raise ApiError(422, "invalid_request", str(e), "steps") from e
    base_seed = body.seed if body.seed is not None else random.randrange(MAX_SEED)
    spec = GenerationSpec(
        class_id=body.class_id, cfg_scale=d.cfg_scale if body.cfg_scale is None else body.cfg_scale,
        steps=body.steps or min(d.steps, settings.max_steps), sampler=body.sampler or d.sampler,
        seeds=tuple((base_seed + k) % (MAX_SEED + 1) for k in range(body.num_images)),
    )
    params = {"model": info.name, "class_id": spec.class_id, "class_name": info.class_names[spec.class_id],
              "cfg_scale": spec.cfg_scale, "steps": spec.steps, "sampler": spec.sampler}
    return Job(spec, OutputSpec(format=body.format, separate=separate, metadata=params),
               deadline=time.monotonic() + timeout)


def submit(service: Service, job: Job) -> None:
    try:
        service.scheduler.submit(job)
    except SchedulerError as e:
        raise ApiError.from_scheduler(e) from e


async def wait(job: Job, request: Request) -> GenerationResult:
    """The job's result; cancels the job when the client disconnects or the deadline passes."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=max(0.0, job.deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    try:
        if result in done:
            return result.result()
        job.cancel()
        if gone in done:
            raise Cancelled("the client went away")
        raise DeadlineExceeded("no result within the request timeout")
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
    return dict(job.output.metadata, images=images, timings=result.timings)


def headers(job: Job, result: GenerationResult) -> dict[str, str]:
    spec = job.spec
    timing = ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in result.timings.items())
    return {
        "X-Seeds": ",".join(map(str, spec.seeds)), "X-Class-Id": str(spec.class_id),
        "X-Class-Name": quote(job.output.metadata["class_name"]), "X-Steps": str(spec.steps),
        "X-Cfg-Scale": f"{spec.cfg_scale:g}", "X-Sampler": spec.sampler, "Server-Timing": timing,
    }


def render(service: Service, job: Job, result: GenerationResult) -> Response:
    """The answer for a finished job: JSON (separate images) or the image / grid itself."""
    service.metrics.images.inc(job.spec.num_images)
    if job.output.separate:
        return JSONResponse(json_body(job, result), headers=headers(job, result))
    image = result.images[0]
    return Response(image.data, media_type=image.media_type, headers=headers(job, result))


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def progress_events(service: Service, job: Job) -> AsyncIterator[str]:
    """Server-sent events: `progress` {step, steps, status} as steps complete, then `result` (the JSON
    answer) or `error` (the error shape). If the client goes away, the job is cancelled."""
    result = asyncio.wrap_future(job.future)
    last = -1
    try:
        while not result.done():
            if job.progress != last:
                last = job.progress
                yield _event("progress", {"step": last, "steps": job.spec.steps, "status": job.status})
            if time.monotonic() > job.deadline:
                job.cancel()
                raise DeadlineExceeded("no result within the request timeout")
            await asyncio.wait({result}, timeout=PROGRESS_POLL_SECONDS)
        service.metrics.images.inc(job.spec.num_images)
        yield _event("progress", {"step": job.spec.steps, "steps": job.spec.steps, "status": "done"})
        yield _event("result", json_body(job, result.result()))
    except SchedulerError as e:
        yield _event("error", ApiError.from_scheduler(e).body())
    finally:
        if not job.future.done():
            job.cancel()  # the stream ended early: the client went away
