"""The scheduler: one worker thread owns the device and batches requests at the step level.

Policy "continuous" (the default), one iteration of the worker loop:
  1. Admit waiting samples round-robin across the waiting requests, in arrival order (one sample of
     each request per round), while they fit in the free row budget (`max_batch_rows`; a guided
     sample costs 2 rows, an unguided one 1). A request for many images thus shares the rows with
     the requests behind it instead of holding them all, and nothing starves: every round serves
     every waiting request.
  2. Drop the samples of requests that were cancelled (client gone) or are past their deadline.
  3. Run ONE denoising step for every sample in flight, each at its own timestep, class, guidance
     scale, sampler and step count: one forward pass for all of them.
  4. Retire requests whose samples have all finished: one batched decode here (samples with NaN/inf
     fail their request instead), then encoding on a thread pool, which resolves the request's
     future. The device thread never encodes.
Policy "request": admit only when nothing is in flight, as many whole requests as fit; that batch
runs until its last request finishes (request-level batching, for comparison).
Policy "none": one request at a time (no batching, for comparison).

Failures: an exception in a step fails the requests of that batch only; an out-of-memory error halves
the row budget and retries the step in two halves; a device error (the context is unusable) fails
everything and reports the server not ready, so that the orchestrator restarts it.
The queue holds at most `max_queue` requests; beyond that `submit` raises QueueFull (HTTP 429).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from model import SampleState

from .contracts import Cancelled, DeadlineExceeded, GenerationFailed, GenerationResult, Job, NotReady, QueueFull
from .encoding import encode
from .faults import is_fatal, is_out_of_memory
from .metrics import Metrics
from .runner import ModelRunner
from .settings import Settings

log = logging.getLogger(__name__)


def _row_cost(job: Job) -> int:
    return 2 if job.spec.cfg_scale != 1.0 else 1


class Scheduler:
    def __init__(self, runner: ModelRunner, settings: Settings, metrics: Metrics,
                 on_fatal: Callable[[str], None] = lambda reason: None):
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self.policy = settings.policy
        self.max_rows = settings.max_batch_rows
        self.on_fatal = on_fatal
        self._queue: deque[Job] = deque()  # requests with samples not yet admitted, in arrival order
        self._cond = threading.Condition()
        self._active: dict[Job, list[SampleState]] = {}  # admitted samples per request, in admission order
        self._stopping = False  # set by stop(): admit nothing new, finish what was accepted
        self._broken: str | None = None  # set on a device error: nothing more can run
        self._encoder = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        self._thread = threading.Thread(target=self._run, name="device-worker", daemon=True)
        self._step_seconds = 0.1  # running mean of one step, for Retry-After estimates

    # ---- called from the HTTP side -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or self._broken:
                raise NotReady(self._broken or "the server is shutting down and takes no new work")
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
        """Stop admitting new requests, finish the queued and in-flight ones, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        self._encoder.shutdown(wait=True)

    def begin_stop(self) -> None:
        """Refuse new requests at once (SIGTERM); the worker keeps finishing what it has."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

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
            self.metrics.active_samples.set(self._samples_in_flight())

    def _samples_in_flight(self) -> int:
        return sum(1 for states in self._active.values() for s in states if not s.done)

    def _rows_in_flight(self) -> int:
        return sum(_row_cost(job) for job, states in self._active.items() for s in states if not s.done)

    def _admit_locked(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if (j.cancelled or now > j.deadline) and j not in self._active]:
            self._queue.remove(job)
            job.fail(Cancelled("the client went away") if job.cancelled
                     else DeadlineExceeded("the request's deadline passed while it waited"))
        if self.policy == "continuous":
            self._admit_round_robin()
        elif not self._active:
            self._admit_whole_requests(limit=1 if self.policy == "none" else None)
        self.metrics.queue_depth.set(len(self._queue))

    def _admit_round_robin(self) -> None:
        free = self.max_rows - self._rows_in_flight()
        while self._queue:
            for job in list(self._queue):
                cost = _row_cost(job)
                if cost > free and (self._active or free < self.max_rows):
                    return  # full: the rest waits for the next step
                if not self._admit_sample(job):
                    continue
                free -= cost

    def _admit_whole_requests(self, limit: int | None) -> None:
        free, admitted = self.max_rows, 0
        while self._queue and (limit is None or admitted < limit):
            job = self._queue[0]
            if job.spec.rows > free and admitted:
                return
            while job in self._queue and self._admit_sample(job):
                pass
            free -= job.spec.rows
            admitted += 1

    def _admit_sample(self, job: Job) -> bool:
        """Admit the request's next sample; the request leaves the queue with its last one."""
        states = self._active.setdefault(job, [])
        try:
            states.append(self.runner.new_state(job.spec, job.spec.seeds[len(states)]))
        except Exception as e:  # a bad spec that validation let through: fail only this request
            log.exception("could not start a request")
            self._queue.remove(job)
            del self._active[job]
            job.fail(GenerationFailed(f"could not start generation: {e}"))
            return False
        if len(states) == 1:
            job.timings.admitted = time.monotonic()
            self.metrics.queue_wait.observe(job.timings.admitted - job.timings.arrival)
        if len(states) == job.spec.num_images:
            self._queue.remove(job)
        return True

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._active if j.cancelled or now > j.deadline]:
            del self._active[job]
            with self._cond:
                if job in self._queue:
                    self._queue.remove(job)
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
            if not self._recover(states, e):
                return
        dt = time.monotonic() - t0
        self._step_seconds = 0.9 * self._step_seconds + 0.1 * dt
        self.metrics.step_duration.observe(dt)
        self.metrics.batch_size.observe(len(states))
        self.metrics.forward_rows.observe(sum(2 if s.guided else 1 for s in states))
        self.metrics.denoise_steps.inc(len(states))
        for job, job_states in self._active.items():  # progress for streaming clients: one int per request
            complete = len(job_states) == job.spec.num_images
            job.progress = min(s.index for s in job_states) if complete else 0

    def _recover(self, states: list[SampleState], e: Exception) -> bool:
        """Handle a failed step; True when it was retried successfully."""
        if is_fatal(e):
            reason = f"device error: {type(e).__name__}: {e}"
            log.critical("%s; failing every request and reporting not ready (restart the server)", reason)
            self._broken = reason
            with self._cond:
                jobs = set(self._active) | set(self._queue)
                self._queue.clear()
            self._active.clear()
            for job in jobs:
                job.fail(NotReady(reason))
            self.on_fatal(reason)
            return False
        if is_out_of_memory(e):
            self.max_rows = max(1, self.max_rows // 2)
            log.warning("out of memory with %d samples in one step: row budget halved to %d; retrying the step "
                        "in two halves", len(states), self.max_rows)
            half = max(1, len(states) // 2)
            try:
                for part in (states[:half], states[half:]):
                    if part:
                        self.runner.step(part)
                return True
            except Exception as again:
                e = again
        log.exception("a denoising step failed; failing the %d requests in this batch", len(self._active),
                      exc_info=e)
        for job in list(self._active):
            job.fail(GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
        with self._cond:
            for job in list(self._active):
                if job in self._queue:
                    self._queue.remove(job)
        self._active.clear()
        return False

    def _retire(self) -> None:
        finished = [job for job, states in self._active.items()
                    if len(states) == job.spec.num_images and all(s.done for s in states)]
        if not finished:
            return
        now = time.monotonic()
        for job in finished:
            job.timings.denoised = now
        states = [s for job in finished for s in self._active.pop(job)]
        finite = self.runner.finite(states)
        start, good, good_states = 0, [], []
        for job in finished:
            n = job.spec.num_images
            if all(finite[start:start + n]):
                good.append(job)
                good_states += states[start:start + n]
            else:
                log.error("request produced NaN/inf values (class %d, seeds %s); failing it", job.spec.class_id,
                          job.spec.seeds)
                job.fail(GenerationFailed("the model produced non-finite values for this request; "
                                          "try another seed or a lower guidance scale"))
            start += n
        if not good:
            return
        t0 = time.monotonic()
        try:
            pixels = self.runner.decode(good_states).numpy()  # (N, H, W, 3) uint8, one decode for all requests
        except Exception as e:
            log.exception("decode failed")
            for job in good:
                job.fail(GenerationFailed(f"decoding failed: {type(e).__name__}: {e}"))
            return
        t1 = time.monotonic()
        self.metrics.decode_duration.observe(t1 - t0)
        start = 0
        for job in good:
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
