"""A job's HTTP answer: waited for (cancelled if the client goes away or the deadline passes), then
answered as an image, JSON, or a stream of server-sent events pushed as the engine reports progress."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..engine.request import ErrorKind, FinishReason, RequestError
from ..service.encoding import MEDIA_TYPES, encode, grid
from ..service.job import Job
from ..service.service import Service
from .errors import ApiError

STREAM, JSON = "text/event-stream", "application/json"


def _accepted(accept: str) -> dict[str, float]:
    """media range -> q, for each entry of an Accept header; none at all accepts anything."""
    ranges = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media:
            ranges[media.lower()] = next((float(p[2:]) for p in params if p.startswith("q=") and _is_number(p[2:])),
                                         1.0)
    return ranges or {"*/*": 1.0}


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _quality(ranges: dict[str, float], media: str, *, explicit: bool = False) -> float:
    """The q an Accept header's ranges give `media`: its most specific matching range's (type/subtype, then
    type/*, then */*); with `explicit`, only a range that names it counts."""
    candidates = [media] if explicit else [media, media.split("/")[0] + "/*", "*/*"]
    return next((ranges[c] for c in candidates if c in ranges), 0.0)


def wants_stream(accept: str) -> bool:
    """Whether the Accept header asks for server-sent events (q > 0, named)."""
    return _quality(_accepted(accept), STREAM, explicit=True) > 0


def negotiate(body, accept: str) -> tuple[str, str]:
    """(what to answer, image format): the answer is STREAM or JSON when the Accept header names it with
    q > 0 (in that order), else an image: the body's `format` (an explicit ask), or the image type the
    header prefers, PNG first among equals. 406 when the header accepts none of these."""
    ranges = _accepted(accept)  # parsed once
    for answer in (STREAM, JSON):
        if _quality(ranges, answer, explicit=True) > 0:
            return answer, body.format
    if "format" in body.model_fields_set:
        return "image", body.format
    q = {f: _quality(ranges, media) for f, media in MEDIA_TYPES.items()}
    best = sorted(MEDIA_TYPES, key=lambda f: (-q[f], f != "png"))[0]
    if q[best] > 0:
        return "image", best
    offered = ", ".join([STREAM, JSON, *MEDIA_TYPES.values()])
    raise ApiError(406, "not_acceptable", f"the Accept header ({accept!r}) accepts none of what this path answers: "
                   f"{offered}")


def submit(service: Service, job: Job) -> None:
    try:
        service.submit(job)
    except RequestError as e:
        raise ApiError.of(e) from e


def watch(job: Job) -> asyncio.Future:
    """The job's end on this event loop. Its outcome counts as retrieved even when nobody awaits it (a
    client gone, a deadline passed), so asyncio never logs "Future exception was never retrieved"."""
    future = asyncio.wrap_future(job.done)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def outcome(job: Job) -> None:
    """Raise the ApiError of a job that ended without images."""
    if job.error is not None:
        raise ApiError.of(job.error)


async def wait(job: Job, request: Request) -> None:
    """Until the job ends; cancels it when the client disconnects or the deadline passes."""
    ended = watch(job)
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({ended, gone}, timeout=max(0.0, job.request.deadline - time.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if ended in done:
        return outcome(job)
    if gone in done:
        job.cancel(FinishReason.CANCELLED)
        raise ApiError.of(RequestError(ErrorKind.CANCELLED, "the client went away"))
    job.cancel(FinishReason.TIMED_OUT)
    raise ApiError.of(RequestError(ErrorKind.DEADLINE_EXCEEDED, f"no result within the request timeout "
                                   f"({job.request.steps} steps); ask for fewer steps or images, or submit it as a "
                                   "job (POST /jobs)"))


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next message is the end)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


def json_body(job: Job, images: list[bytes] | None = None) -> dict:
    seeds, media_type = job.request.seeds, MEDIA_TYPES[job.format]
    images = [{"seed": seeds[k], "media_type": media_type, "data": base64.b64encode(data).decode()}
              for k, data in enumerate(job.images if images is None else images)]
    return dict(job.parameters, cache=job.request.sampling.cache.describe(), images=images, timings=job.timings,
                replica=job.replica)


# The headers of an answer, in the order `headers` gives their values (CORS exposes them: server/http/app.py).
ANSWER_HEADERS = ("X-Seeds", "X-Class-Id", "X-Class-Name", "X-Steps", "X-Cfg-Scale", "X-Sampler",
                  "X-Guidance-Interval", "X-Replica", "Server-Timing")


def headers(job: Job) -> dict[str, str]:
    r, s = job.request, job.request.sampling
    values = (",".join(map(str, r.seeds)), str(r.class_id), quote(job.class_name),
              str(s.steps), f"{s.cfg_scale:g}", s.sampler, "{:g},{:g}".format(*s.guidance_interval), job.replica,
              ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in job.timings.items()))
    return dict(zip(ANSWER_HEADERS, values, strict=True))


def render(service: Service, job: Job, images: list[bytes] | None = None) -> Response:
    """The answer for a finished job: JSON (separate images) or the image / grid itself. `images`: its
    images, where the job holds none (one read back from the job store)."""
    images = job.images if images is None else images
    service.metrics.images.inc(job.request.num_images)
    if job.separate:
        return JSONResponse(json_body(job, images), headers=headers(job))
    return Response(images[0], media_type=MEDIA_TYPES[job.format], headers=headers(job))


def event(name: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def preview_body(job: Job, step: int, pixels) -> dict:
    """A `preview` event: the request's images at this step as one small PNG grid, base64."""
    image = grid(pixels)  # (h, w, 3)
    png = encode(image[None], job.request.seeds, "png")[0]
    return {"step": step, "steps": job.request.steps, "media_type": MEDIA_TYPES["png"],
            "data": base64.b64encode(png).decode(), "width": image.shape[1], "height": image.shape[0]}


def progress(job: Job) -> dict:
    """A job's progress as its stream reports it: {step, steps, status}, and queue_position while queued."""
    r = job.request
    out = {"step": r.step, "steps": r.steps, "status": job.status}
    if out["status"] == "queued" and r.queue_position is not None:
        out["queue_position"] = r.queue_position
    return out


async def progress_events(service: Service, job: Job) -> AsyncIterator[str]:
    """Server-sent events: `progress` {step, steps, status[, queue_position]} whenever one changes,
    `preview` when the engine sends one, then `result` (the JSON answer) or `error` (the error shape).
    Woken by the job's changes (pushed); if the client goes away, the job is cancelled."""
    changed = job.listen()
    last, shown = None, None
    try:
        while not job.ended:
            changed.clear()  # before reading: a change after this wakes the next wait
            now = progress(job)
            if now != last:
                last = now
                yield event("progress", now)
            preview = job.preview
            if preview is not None and preview is not shown:
                shown = preview
                yield event("preview", preview_body(job, *preview))
            try:
                await asyncio.wait_for(changed.wait(), timeout=max(0.0, job.request.deadline - time.time()))
            except TimeoutError:
                if not job.ended:
                    job.cancel(FinishReason.TIMED_OUT)
                    raise ApiError.of(RequestError(ErrorKind.DEADLINE_EXCEEDED, "no result within the request "
                                                   "timeout")) from None
        outcome(job)
        service.metrics.images.inc(job.request.num_images)
        yield event("progress", {"step": job.request.steps, "steps": job.request.steps, "status": "done"})
        yield event("result", json_body(job))
    except ApiError as e:
        yield event("error", e.body())
    finally:
        job.unlisten(changed)
        if not job.ended:
            job.cancel(FinishReason.CANCELLED)  # the stream ended early: the client went away
