"""The async jobs a front-end holds (POST /jobs): in memory, a finished job kept `--job-ttl` seconds, at
most `--max-jobs` at once. With API keys on, a job belongs to the key that created it."""

from __future__ import annotations

import threading
import time

from .job import Job


class StoreFull(Exception):
    """`--max-jobs` jobs are held."""


class JobStore:
    def __init__(self, ttl: float, max_jobs: int):
        self.ttl, self.max_jobs = ttl, max_jobs
        self._jobs: dict[str, Job] = {}  # in submission order
        self._finished: dict[str, float] = {}  # id -> when it ended (time.monotonic)
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._expire()
            if len(self._jobs) >= self.max_jobs:
                raise StoreFull(f"{len(self._jobs)} jobs are held")
            self._jobs[job.id] = job
        job.done.add_done_callback(lambda _: self._finished.setdefault(job.id, time.monotonic()))

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._finished.pop(job_id, None)

    def get(self, job_id: str, owner: str | None) -> Job | None:
        """The job, if `owner` may see it; a job of another key is as unknown as one never submitted."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        return job if job is not None and job.request.owner == owner else None

    def of(self, owner: str | None, limit: int) -> list[Job]:
        with self._lock:
            self._expire()
            mine = [job for job in reversed(self._jobs.values()) if job.request.owner == owner]
        return mine[:limit]

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id, finished in list(self._finished.items()):
            if now - finished > self.ttl:
                self._jobs.pop(job_id, None)
                del self._finished[job_id]
