"""The async job API for long generations: submit, list, poll, fetch, cancel.

    POST /jobs            same body as /generate (+ webhook_url, tag) -> 202 the job's status, Location
    GET /jobs             the caller's jobs, newest first (?limit=, at most 100)
    GET /jobs/{id}        {"status": queued|running|encoding|done|failed|cancelled|timed_out, "step", ...}
    GET /jobs/{id}/result the image (or JSON, if the job was submitted with Accept: application/json)
    DELETE /jobs/{id}     cancel: its samples are dropped at the next denoising step

With API keys on, a job belongs to the key that created it: with any other key it is 404, as if it did
not exist. Jobs live in memory: a finished job is kept `--job-ttl` seconds, at most `--max-jobs` at once.
"""

# No `from __future__ import annotations` here: FastAPI must see `request_model` itself in the route below.
import secrets
import threading
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from .answers import make_job, render, submit, watch
from .contracts import Cancelled, DeadlineExceeded, FinishReason, GenerationFailed, Job, SchedulerError
from .errors import ApiError, error_responses
from .schemas import JobList, JobStatus
from .service import Service
from .webhooks import Webhooks

FULL_RETRY_SECONDS = 10  # Retry-After when --max-jobs are held: finished ones expire, clients fetch theirs
POLL_SECONDS = 2  # Retry-After of a result asked for before the job is done


@dataclass(eq=False)
class JobRecord:
    id: str
    job: Job
    tag: str | None = None
    created: float = field(default_factory=time.time)  # unix seconds, for clients

    def status(self) -> dict:
        """The job's status JSON (GET /jobs/{id}, the webhook body)."""
        job, status = self.job, self.job.status
        out = {"id": self.id, "status": status, "step": job.progress, "steps": job.spec.steps,
               "queue_position": job.queue_position if status == "queued" else None,
               "num_images": job.spec.num_images, "seeds": list(job.spec.seeds), "class_id": job.spec.class_id,
               "class_name": job.output.metadata["class_name"], "tag": self.tag, "created": self.created,
               "status_url": f"/jobs/{self.id}", "result_url": f"/jobs/{self.id}/result", "error": None}
        error = self.error()
        out["error"] = error.body()["error"] if error is not None else None
        return out

    def error(self) -> ApiError | None:
        """Why the job has no result (None while it may still get one, and once it has one)."""
        job = self.job
        if job.future.done() and job.future.exception() is None:
            return None  # done, even if a cancel came too late
        if job.cancel_reason is not None:  # this side's words: the scheduler only knows the samples were dropped
            return _cancelled(self.id, job.cancel_reason)
        error = job.future.exception() if job.future.done() else None
        if isinstance(error, SchedulerError):
            return ApiError.from_scheduler(error)
        return None if error is None else ApiError.from_scheduler(GenerationFailed(str(error)))


def _cancelled(job_id: str, reason: FinishReason) -> ApiError:
    if reason == FinishReason.TIMED_OUT:
        return ApiError.from_scheduler(DeadlineExceeded(f"job {job_id} ran past --job-timeout"))
    return ApiError.from_scheduler(Cancelled(f"job {job_id} was cancelled (DELETE /jobs/{job_id}); it has no result"))


class JobStore:
    def __init__(self, ttl: float, max_jobs: int):
        self.ttl, self.max_jobs = ttl, max_jobs
        self._jobs: dict[str, JobRecord] = {}  # in submission order
        self._finished: dict[str, float] = {}  # id -> when its future resolved
        self._lock = threading.Lock()

    def add(self, job: Job, tag: str | None) -> JobRecord:
        with self._lock:
            self._expire()
            if len(self._jobs) >= self.max_jobs:
                raise ApiError(429, "too_many_jobs", f"{len(self._jobs)} jobs are held; fetch or cancel some, "
                               "or try again later", retry_after=FULL_RETRY_SECONDS)
            record = JobRecord(secrets.token_urlsafe(12), job, tag)
            self._jobs[record.id] = record
        job.future.add_done_callback(lambda _: self._finished.setdefault(record.id, time.monotonic()))
        return record

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._finished.pop(job_id, None)

    def get(self, job_id: str, owner: str | None) -> JobRecord:
        """The job, if `owner` may see it; a job of another key is as unknown as one never submitted."""
        with self._lock:
            self._expire()
            record = self._jobs.get(job_id)
        if record is None or record.job.owner != owner:
            raise ApiError(404, "unknown_job", f"no job {job_id!r}: never submitted (with this API key), or "
                           f"expired {self.ttl:g} s after it ended", "id")
        return record

    def of(self, owner: str | None, limit: int) -> list[JobRecord]:
        with self._lock:
            self._expire()
            mine = [r for r in reversed(self._jobs.values()) if r.job.owner == owner]
        return mine[:limit]

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id, finished in list(self._finished.items()):
            if now - finished > self.ttl:
                self._jobs.pop(job_id, None)
                del self._finished[job_id]


def _owner(request: Request) -> str | None:
    return getattr(request.state, "owner", None)


def jobs_router(service: Service, request_model, webhooks: Webhooks) -> APIRouter:
    settings = service.settings
    store = JobStore(settings.job_ttl, settings.max_jobs)
    router = APIRouter(prefix="/jobs", tags=["jobs"])
    not_found = error_responses(401, 404)

    @router.post("", status_code=202, response_model=JobStatus,
                 responses=error_responses(401, 408, 413, 415, 422, 429, 503),
                 summary="submit a long generation; poll it, fetch its result or cancel it")
    async def create(body: request_model, request: Request):  # type: ignore[valid-type]
        url = webhooks.check(body.webhook_url) if body.webhook_url is not None else None
        want_json = "application/json" in request.headers.get("accept", "")
        job = make_job(service, body, request, separate=want_json, timeout=settings.job_timeout, tag=body.tag)
        record = store.add(job, body.tag)
        try:
            submit(service, job)
        except ApiError:
            store.remove(record.id)
            raise
        if url is not None:
            webhooks.deliver_when_done(job, record.id, url, record.status)
        return JSONResponse(record.status(), status_code=202, headers={"Location": f"/jobs/{record.id}"})

    @router.get("", response_model=JobList, responses=error_responses(401, 422),
                summary="the caller's jobs, newest first")
    async def listing(request: Request, limit: int = Query(50, ge=1, le=100, description="at most this many")):
        return {"jobs": [r.status() for r in store.of(_owner(request), limit)]}

    @router.get("/{job_id}", response_model=JobStatus, responses=not_found, summary="status and progress of a job")
    async def status(job_id: str, request: Request):
        return store.get(job_id, _owner(request)).status()

    @router.get("/{job_id}/result", response_class=Response, summary="the result of a finished job",
                responses=error_responses(401, 404, 409, 500, 503, 504))
    async def result(job_id: str, request: Request):
        record = store.get(job_id, _owner(request))
        job, error = record.job, record.error()
        if error is not None:
            raise error
        if not job.future.done():
            raise ApiError(409, "not_finished", f"job {job_id} is {job.status} (step {job.progress} of "
                           f"{job.spec.steps}); poll /jobs/{job_id}", retry_after=POLL_SECONDS)
        return render(service, job, await watch(job))

    @router.delete("/{job_id}", response_model=JobStatus, responses=not_found,
                   summary="cancel a job (its samples are dropped at the next step)")
    async def cancel(job_id: str, request: Request):
        record = store.get(job_id, _owner(request))
        if not record.job.future.done():
            record.job.cancel(FinishReason.CANCELLED)
        return record.status()

    return router
