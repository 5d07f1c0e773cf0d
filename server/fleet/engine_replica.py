"""An engine replica: one Ray Serve replica = one engine (scheduler + model runner) = one device.

The constructor loads the model and warms up, so Serve routes nothing to a replica before it can
serve (Serve sends requests once the constructor has returned). Each request is one call of `run`,
whose answer is a stream: updates while it waits and runs, previews, then its pixels or its error.
The step loop runs on the engine's own thread; this replica's event loop only relays, and the HTTP
load lands on the front-end's process, not here. Every second the replica reports its load and its
metrics to the front-end (`Report`). Serve's health check calls `check_health`, which fails once the
device is unusable or the engine thread has ended, and Serve then replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

import numpy as np
from prometheus_client import generate_latest
from ray import serve

from ..admission import Admission
from ..contracts import Job, OutputSpec, SchedulerError
from ..engine import messages as msg
from ..engine.client import LocalEngine
from ..logs import setup_logging
from ..metrics import EngineMetrics
from ..settings import Settings
from .messages import REPORT_SECONDS, Finished, Report, Request, Update, to_age

log = logging.getLogger(__name__)

UPDATE_SECONDS = 0.05  # how often a request's stream looks at its progress (as the SSE stream does)


class EngineReplica:
    async def __init__(self, settings: Settings, frontend: str):
        setup_logging(settings.log_level, settings.log_format)
        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_id.unique_id}"
        self.settings = settings
        self.metrics = EngineMetrics()  # this replica's own registry, reported to the front-end
        self.engine = LocalEngine(settings, self, self.metrics)
        self.info: msg.EngineInfo | None = None
        self.failed: str | None = None
        self.fatal: str | None = None
        # Each replica also checks its own exact queue and deadline (the front-end's check is fleet-wide).
        self.admission = Admission(settings.max_queue, None, settings.deadline_admission)
        await asyncio.to_thread(self.engine.boot, self.name)
        if self.info is None:
            raise RuntimeError(f"the engine could not start: {self.failed}")  # Serve retries the replica
        self.frontend = serve.get_deployment_handle(frontend, app_name=context.app_name)
        self._reporter = asyncio.create_task(self._report_forever())
        log.info("engine replica %s ready (pid %d)", self.name, os.getpid())

    # ---- EngineEvents (from the engine's threads) ----------------------------------------------------
    def on_status(self, text: str) -> None:
        log.info("engine replica: %s", text)

    def on_started(self, info: msg.EngineInfo) -> None:
        self.info = info

    def on_start_failed(self, reason: str) -> None:
        self.failed = reason

    def on_fatal(self, reason: str) -> None:
        self.fatal = reason

    def on_died(self, reason: str) -> None:  # EngineEvents; only an engine process dies on its own
        self.fatal = reason

    def on_capacity(self, serving: bool, status: str) -> None:  # EngineEvents; only a fleet's front-end's
        pass

    def deliver(self, job: Job, pixels: np.ndarray) -> None:
        job.future.set_result(pixels)  # the job's stream sends them (the future holds them until then)

    # ---- called through deployment handles -----------------------------------------------------------
    async def run(self, request: Request) -> AsyncIterator:
        """One request: Update whenever its progress changes, Preview, then Finished or Failed."""
        now = time.monotonic()
        job = Job(request.spec, OutputSpec(), deadline=now + request.seconds_left, owner=request.owner)
        job.timings.arrival = now - request.age
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(_resolve, done))
        try:
            self.admission.check(job, self.engine.load(), 0, now)
            self.engine.submit(job)
        except SchedulerError as e:
            yield msg.Failed.of(0, e, None)
            return
        last, shown = None, None
        try:
            while True:
                state = (job.progress, job.queue_position, job.timings.admitted)
                if state != last:
                    last = state
                    admitted = to_age(job.timings.admitted, time.monotonic())
                    yield Update(self.name, job.progress, job.queue_position, admitted)
                if job.preview is not None and job.preview is not shown:
                    shown = job.preview
                    yield msg.Preview(0, *shown)
                if done.done():
                    break
                await asyncio.wait((done,), timeout=UPDATE_SECONDS)  # no task per wait, only a timer
        except (asyncio.CancelledError, GeneratorExit):
            job.cancel()  # the front-end cancelled the call: the client went away or the deadline passed
            raise
        yield self._outcome(job)

    def _outcome(self, job: Job):
        error = job.future.exception()
        if error is not None:
            return msg.Failed.of(0, error, None)
        t, now = job.timings, time.monotonic()
        return Finished(job.future.result(), to_age(t.admitted, now), to_age(t.denoised, now), to_age(t.decoded, now))

    def describe(self) -> tuple[msg.EngineInfo, int]:
        """The model facts, and this replica's process id (tests kill it by that)."""
        return self.info, os.getpid()

    def arm_fault(self, kind: str, count: int) -> None:
        self.engine.arm_fault(kind, count)

    def check_health(self) -> None:
        problem = self.fatal or self.engine.scheduler.problem()
        if problem:
            raise RuntimeError(f"engine replica {self.name} cannot serve: {problem}")

    # ---- reporting and stopping ----------------------------------------------------------------------
    async def _report_forever(self) -> None:
        """Every second, until the device is unusable (then the front-end stops counting on this replica,
        while Serve's health checks replace it)."""
        while not self.fatal:
            try:
                report = Report(self.name, self.engine.load(), generate_latest(self.metrics.registry))
                await asyncio.wait_for(self.frontend.report.remote(report), 2 * REPORT_SECONDS)
            except Exception as e:  # the front-end restarting or busy: try again next time
                log.debug("could not report to the front-end: %s", e)
            await asyncio.sleep(REPORT_SECONDS)

    async def __del__(self):
        """Serve removes this replica (scale-down, redeploy): it has already waited for the requests in
        flight (graceful_shutdown_timeout_s); stop the engine thread."""
        if getattr(self, "_reporter", None) is not None:  # Serve may stop a replica before it has started
            self._reporter.cancel()
        await asyncio.to_thread(self.engine.stop, self.settings.request_timeout)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
