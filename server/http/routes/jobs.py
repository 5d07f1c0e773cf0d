"""The async job API for long generations: submit, list, poll, fetch, cancel.

    POST /jobs            same body as /generate (+ webhook_url, tag) -> 202 the job's status, Location
    GET /jobs             the caller's jobs, newest first (?limit=, at most 100)
    GET /jobs/{id}        {"status": queued|running|encoding|done|failed|cancelled|timed_out, "step", ...}
    GET /jobs/{id}/result the image (or JSON, if the job was submitted with Accept: application/json)
    DELETE /jobs/{id}     cancel a queued or running job (its samples are dropped at the next step);
                          remove an ended one (its place is free at once; 404 afterwards)

A job's id is its engine request's id. Jobs are kept in the job store (server/service/job_store.py), so
they outlive the process: a job answered 202 ends once, with its result, across restarts. With API keys
on, a job belongs to the key that created it: with any other key it is 404, as if it did not exist.
`Idempotency-Key: K` on POST makes a retry with the same body return the same job (another body: 422).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from ...engine.request import ErrorKind, FinishReason, RequestError
from ...service.job import Job
from ...service.job_store import IdempotencyConflict, JobStore, StoreError, StoreFull
from .. import answers
from ..door import AnyService, make_job, owner
from ..errors import ApiError, error_responses
from ..schemas import JobList, JobRequest, JobStatus

log = logging.getLogger(__name__)

FULL_RETRY_SECONDS = 10  # Retry-After when --max-jobs are held: finished ones expire, clients fetch theirs
POLL_SECONDS = 2  # Retry-After of a result asked for before the job is done

router = APIRouter(prefix="/jobs", tags=["jobs"])
not_found = error_responses(401, 404, 503)


def store(request: Request) -> JobStore:
    return request.app.state.service.jobs


async def _stored(call, *args, **kwargs):
    """A job store call, off the event loop (a database round trip); 503 when the store is unavailable."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except StoreError as e:
        raise ApiError(503, "store_unavailable", str(e), retry_after=POLL_SECONDS) from e


Jobs = Annotated[JobStore, Depends(store)]


def status(job: Job) -> dict:
    """The job's status JSON (GET /jobs/{id}, the webhook body)."""
    r, state = job.request, job.status
    error = _error(job)
    return {"id": job.id, "status": state, "step": r.step, "steps": r.steps,
            "queue_position": r.queue_position if state == "queued" else None, "num_images": r.num_images,
            "seeds": list(r.seeds), "class_id": r.class_id, "class_name": job.class_name,
            "cache": r.sampling.cache.describe(),
            "tag": job.tag, "created": job.created, "status_url": f"/jobs/{job.id}",
            "result_url": f"/jobs/{job.id}/result", "error": error.body()["error"] if error is not None else None}


def _error(job: Job) -> ApiError | None:
    """Why the job has no result (None while it may still get one, and once it has one)."""
    if job.ended and job.error is None:
        return None  # done, even if a cancel came too late
    if job.cancel_reason is not None:  # this side's words: the engine only knows the samples were dropped
        if job.cancel_reason == FinishReason.TIMED_OUT:
            return ApiError.of(RequestError(ErrorKind.DEADLINE_EXCEEDED, f"job {job.id} ran past --job-timeout"))
        return ApiError.of(RequestError(ErrorKind.CANCELLED, f"job {job.id} was cancelled (DELETE /jobs/{job.id}); "
                                        "it has no result"))
    return ApiError.of(job.error) if job.error is not None else None


async def _find(jobs: JobStore, job_id: str, request: Request) -> Job:
    job = await _stored(jobs.get, job_id, owner(request))
    if job is None:
        raise ApiError(404, "unknown_job", f"no job {job_id!r}: never submitted (with this API key), or expired "
                       f"{jobs.ttl:g} s after it ended", "id")
    return job


@router.post("", status_code=202, response_model=JobStatus,
             responses=error_responses(401, 406, 408, 413, 415, 422, 429, 503),
             summary="submit a long generation; poll it, fetch its result or cancel it")
async def create(body: JobRequest, request: Request, svc: AnyService, jobs: Jobs):
    webhooks = request.app.state.webhooks
    url = webhooks.check(body.webhook_url) if body.webhook_url is not None else None
    # the result's form (the 202 itself is JSON): JSON when the Accept header names it, else the image
    answer, fmt = answers.negotiate(body, request.headers.get("accept", ""))
    job = make_job(svc, body, request, fmt=fmt, separate=answer == answers.JSON, timeout=svc.settings.job_timeout,
                   tag=body.tag, webhook_url=url)
    key = request.headers.get("idempotency-key")
    fingerprint = hashlib.sha256(json.dumps([body.model_dump(mode="json"), fmt, answer], sort_keys=True).encode()
                                 ).hexdigest() if key is not None else None
    try:
        stored = await _stored(jobs.add, job, idempotency_key=key, fingerprint=fingerprint)
    except StoreFull as e:
        raise ApiError(429, "too_many_jobs", f"{e}: DELETE /jobs/{{id}} of an ended job frees its place at once (an "
                       f"unfinished one is cancelled by it, and frees its place when deleted again once it has "
                       f"ended); ended jobs also leave {svc.settings.job_ttl:g} s after their end",
                       retry_after=FULL_RETRY_SECONDS) from e
    except IdempotencyConflict as e:
        raise ApiError.invalid([("idempotency-key", str(e))]) from e
    if stored is not job:  # a retry of a request already taken: the same job
        return JSONResponse(status(stored), status_code=202, headers={"Location": f"/jobs/{stored.id}"})
    try:
        answers.submit(svc, job)
    except ApiError:
        await _stored(jobs.remove, job.id)
        raise
    if url is not None:
        webhooks.deliver_when_done(job, url, lambda: status(job), lambda: not jobs.left_pending(job))
    return JSONResponse(status(job), status_code=202, headers={"Location": f"/jobs/{job.id}"})


@router.get("", response_model=JobList, responses=error_responses(401, 422, 503),
            summary="the caller's jobs, newest first")
async def listing(request: Request, jobs: Jobs,
                  limit: int = Query(50, ge=1, le=100, description="at most this many")):
    return {"jobs": [status(job) for job in await _stored(jobs.of, owner(request), limit)]}


@router.get("/{job_id}", response_model=JobStatus, responses=not_found, summary="status and progress of a job")
async def get_status(job_id: str, request: Request, jobs: Jobs):
    return status(await _find(jobs, job_id, request))


@router.get("/{job_id}/result", response_class=Response, summary="the result of a finished job",
            responses=error_responses(401, 404, 409, 500, 503, 504))
async def result(job_id: str, request: Request, svc: AnyService, jobs: Jobs):
    job = await _find(jobs, job_id, request)
    error = _error(job)
    if error is not None:
        raise error
    if not job.ended:
        raise ApiError(409, "not_finished", f"job {job_id} is {job.status} (step {job.request.step} of "
                       f"{job.request.steps}); poll /jobs/{job_id}", retry_after=POLL_SECONDS)
    return answers.render(svc, job, await _stored(jobs.images, job))


@router.delete("/{job_id}", response_model=JobStatus, responses=not_found,
               summary="cancel a queued or running job (its samples are dropped at the next step); remove an "
                       "ended one (its place is free at once, and it is 404 afterwards)")
async def cancel(job_id: str, request: Request, jobs: Jobs):
    job = await _find(jobs, job_id, request)
    if job.ended:
        answer = status(job)
        await _stored(jobs.remove, job_id)
        return answer
    if not jobs.holds(job_id):  # left by the last process and not resumed yet: cancelled in the store
        await _stored(jobs.cancel, job)
        return status(await _find(jobs, job_id, request))
    job.cancel(FinishReason.CANCELLED)
    return status(job)


async def resume(app, ready: asyncio.Event) -> None:
    """Once the engine is ready, the job store's claims (every few seconds: jobs that no live front-end
    holds) run here: pending ones are submitted again, and each job's webhook is delivered when it ends
    (at once for an ended one whose delivery the last holder left pending)."""
    svc, webhooks, jobs = app.state.service, app.state.webhooks, app.state.service.jobs
    await ready.wait()
    loop = asyncio.get_running_loop()

    def deliver(claimed: list[Job]) -> None:
        for job in claimed:
            if job.webhook_url is not None:
                webhooks.deliver_when_done(job, job.webhook_url, lambda job=job: status(job),
                                           lambda job=job: not jobs.left_pending(job))

    def claimed(found: list[Job]) -> None:  # on the store's thread
        svc.resume(found)
        loop.call_soon_threadsafe(deliver, found)

    jobs.can_claim = lambda: svc.can_resume
    jobs.on_claim = claimed
    svc.datasets.start()  # datasets made here, and those no live front-end runs
