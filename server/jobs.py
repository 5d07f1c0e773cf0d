"""The async job API for long generations: submit, poll, fetch, cancel.

    POST /jobs            same body as /generate -> 202 {"id", "status_url", "result_url"}
    GET /jobs/{id}        {"status": queued|running|encoding|done|failed|cancelled, "step", "steps", ...}
    GET /jobs/{id}/result the image (or JSON, if the job was submitted with Accept: application/json)
    DELETE /jobs/{id}     cancel: its samples are dropped at the next denoising step

Jobs live in memory: a finished job is kept `--job-ttl` seconds, at most `--max-jobs` at once.
"""

import asyncio
import secrets
import threading
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .contracts import Job, SchedulerError
from .errors import ERROR_RESPONSES, ApiError
from .generation import make_job, render, submit
from .service import Service


class JobStore:
    def __init__(self, ttl: float, max_jobs: int):
        self.ttl, self.max_jobs = ttl, max_jobs
        self._jobs: dict[str, Job] = {}
        self._finished: dict[str, float] = {}  # id -> when its future resolved
        self._lock = threading.Lock()

    def add(self, job: Job) -> str:
        with self._lock:
            self._expire()
            if len(self._jobs) >= self.max_jobs:
                raise ApiError(429, "too_many_jobs", f"{len(self._jobs)} jobs are held; fetch or cancel some, "
                               "or try again later", retry_after=10)
            job_id = secrets.token_urlsafe(12)
            self._jobs[job_id] = job
        job.future.add_done_callback(lambda _: self._finished.setdefault(job_id, time.monotonic()))
        return job_id

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._expire()
            if job_id not in self._jobs:
                raise ApiError(404, "unknown_job", f"no job {job_id!r}: never submitted, or expired after "
                               f"{self.ttl:g} s", "id")
            return self._jobs[job_id]

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id, finished in list(self._finished.items()):
            if now - finished > self.ttl:
                self._jobs.pop(job_id, None)
                del self._finished[job_id]


def jobs_router(service: Service, request_model) -> APIRouter:
    settings = service.settings
    store = JobStore(settings.job_ttl, settings.max_jobs)
    router = APIRouter(prefix="/jobs", tags=["jobs"])

    @router.post("", status_code=202, summary="submit a long generation; poll it, fetch its result or cancel it",
                 responses=ERROR_RESPONSES)
    async def create(body: request_model, request: Request):  # type: ignore[valid-type]
        want_json = "application/json" in request.headers.get("accept", "")
        job = make_job(service, body, separate=want_json, timeout=settings.job_timeout)
        job_id = store.add(job)
        submit(service, job)
        return JSONResponse({"id": job_id, "status": job.status, "status_url": f"/jobs/{job_id}",
                             "result_url": f"/jobs/{job_id}/result"}, status_code=202)

    @router.get("/{job_id}", summary="status and progress of a job")
    async def status(job_id: str):
        job = store.get(job_id)
        out = {"id": job_id, "status": job.status, "step": job.progress, "steps": job.spec.steps,
               "num_images": job.spec.num_images, "seeds": list(job.spec.seeds)}
        if job.status in ("failed", "cancelled"):
            error = job.future.exception() if job.future.done() else None
            out["error"] = str(error) if error else "cancelled"
        return out

    @router.get("/{job_id}/result", summary="the result of a finished job", response_class=Response)
    async def result(job_id: str):
        job = store.get(job_id)
        if not job.future.done():
            raise ApiError(409, "not_finished", f"job {job_id} is {job.status} (step {job.progress} of "
                           f"{job.spec.steps}); poll /jobs/{job_id}", retry_after=2)
        try:
            outcome = await asyncio.wrap_future(job.future)
        except SchedulerError as e:
            raise ApiError.from_scheduler(e) from e
        return render(service, job, outcome)

    @router.delete("/{job_id}", summary="cancel a job (its samples are dropped at the next step)")
    async def cancel(job_id: str):
        job = store.get(job_id)
        if not job.future.done():
            job.cancel()
        return {"id": job_id, "status": "cancelled" if not job.future.done() else job.status}

    return router
