"""The scheduler: one worker thread owns the device and batches requests at the step level.

Policy "continuous" (the default), one iteration of the worker loop:
  1. Admit waiting jobs in arrival order while the head job's rows fit in the free row budget
     (`max_batch_rows`; a guided sample costs 2 rows, an unguided one 1). The queue is never
     reordered, so nothing starves; a job larger than the whole budget runs when nothing else is
     in flight.
  2. Drop the samples of jobs that were cancelled (client gone) or are past their deadline.
  3. Run ONE denoising step for every sample in flight, each at its own timestep, class, guidance
     scale, sampler and step count: one forward pass for all of them.
  4. Retire jobs whose samples have all finished: one batched decode here, then encoding on a thread
     pool, which resolves the job's future. The device thread never encodes.
Policy "request": admit only when nothing is in flight, as many queued jobs as fit; that batch runs
until its last job finishes (request-level batching, for comparison).
Policy "none": one job at a time (no batching, for comparison).

The queue holds at most `max_queue` jobs; beyond that `submit` raises QueueFull (HTTP 429).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from model import SampleState

from .contracts import Cancelled, DeadlineExceeded, GenerationFailed, GenerationResult, Job, NotReady, QueueFull
from .encoding import encode
from .metrics import Metrics
from .runner import ModelRunner
from .settings import Settings

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, runner: ModelRunner, settings: Settings, metrics: Metrics):
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self.policy = settings.policy
        self.max_rows = settings.max_batch_rows
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._active: dict[Job, list[SampleState]] = {}  # jobs in flight, in admission order
        self._stopping = False  # set by stop(): admit nothing new, finish what was accepted
        self._encoder = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        self._thread = threading.Thread(target=self._run, name="device-worker", daemon=True)
        self._step_seconds = 0.1  # running mean of one step, for Retry-After estimates

    # ---- called from the HTTP side -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise NotReady("the server is shutting down and takes no new work")
            if len(self._queue) >= self.settings.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting; try again later",
                                retry_after=self.retry_after())
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()

    def retry_after(self) -> float:
        """Rough seconds until the queue has room: the queued work's steps over the batch's width."""
        queued_steps = sum(j.spec.steps * j.spec.rows for j in self._queue)
        return max(1.0, queued_steps / max(1, self.max_rows) * self._step_seconds)

    def stop(self, timeout: float | None = None) -> None:
        """Stop admitting new jobs, finish the queued and in-flight ones, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        self._encoder.shutdown(wait=True)

    # ---- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue and not self._active:
                    return
                self._admit_locked()
            self._drop_abandoned()
            if self._active:
                self._step()
                self._retire()
            self.metrics.active_samples.set(sum(len(states) for states in self._active.values()))

    def _rows_in_flight(self) -> int:
        return sum(job.spec.rows for job in self._active)

    def _admit_locked(self) -> None:
        if self.policy != "continuous" and self._active:
            return
        free = self.max_rows - self._rows_in_flight()
        while self._queue:
            job = self._queue[0]
            if job.cancelled or time.monotonic() > job.deadline:
                self._queue.popleft()
                job.fail(Cancelled("the client went away") if job.cancelled
                         else DeadlineExceeded("the request's deadline passed while it waited"))
                continue
            if job.spec.rows > free and self._active:
                break
            self._queue.popleft()
            try:
                states = self.runner.new_states(job.spec)
            except Exception as e:  # a bad spec that validation let through: fail only this job
                log.exception("could not start a job")
                job.fail(GenerationFailed(f"could not start generation: {e}"))
                continue
            job.timings.admitted = time.monotonic()
            self.metrics.queue_wait.observe(job.timings.admitted - job.timings.arrival)
            self._active[job] = states
            free -= job.spec.rows
            if self.policy == "none":
                break
        self.metrics.queue_depth.set(len(self._queue))

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._active if j.cancelled or now > j.deadline]:
            del self._active[job]
            job.fail(Cancelled("the client went away") if job.cancelled
                     else DeadlineExceeded("the request's deadline passed during generation"))

    def _step(self) -> None:
        states = [s for ss in self._active.values() for s in ss if not s.done]
        if not states:
            return
        t0 = time.monotonic()
        try:
            self.runner.step(states)
        except Exception as e:
            log.exception("a denoising step failed; failing the %d requests in this batch", len(self._active))
            for job in list(self._active):
                job.fail(GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
            self._active.clear()
            return
        dt = time.monotonic() - t0
        self._step_seconds = 0.9 * self._step_seconds + 0.1 * dt
        self.metrics.step_duration.observe(dt)
        self.metrics.batch_size.observe(len(states))
        self.metrics.forward_rows.observe(sum(2 if s.guided else 1 for s in states))
        self.metrics.denoise_steps.inc(len(states))
        for job, job_states in self._active.items():  # progress for streaming clients: one int per job
            job.progress = min(s.index for s in job_states)

    def _retire(self) -> None:
        finished = [job for job, states in self._active.items() if all(s.done for s in states)]
        if not finished:
            return
        now = time.monotonic()
        all_states = []
        for job in finished:
            job.timings.denoised = now
            all_states += self._active.pop(job)
        t0 = time.monotonic()
        try:
            pixels = self.runner.decode(all_states).numpy()  # (N, H, W, 3) uint8, one decode for all jobs
        except Exception as e:
            log.exception("decode failed")
            for job in finished:
                job.fail(GenerationFailed(f"decoding failed: {type(e).__name__}: {e}"))
            return
        t1 = time.monotonic()
        self.metrics.decode_duration.observe(t1 - t0)
        start = 0
        for job in finished:
            job.timings.decoded = t1
            n = job.spec.num_images
            self._encoder.submit(self._encode, job, pixels[start:start + n])
            start += n

    def _encode(self, job: Job, pixels) -> None:
        try:
            t0 = time.monotonic()
            images = encode(pixels, job.spec.seeds, job.output)
            job.timings.encoded = time.monotonic()
            self.metrics.encode_duration.observe(job.timings.encoded - t0)
            if not job.future.done():
                job.future.set_result(GenerationResult(images, job.timings.durations()))
        except Exception as e:
            log.exception("encoding failed")
            job.fail(GenerationFailed(f"encoding failed: {type(e).__name__}: {e}"))
