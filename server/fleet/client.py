"""The front-end's handle on a fleet of engine replicas (Ray Serve): the calls of EngineProcess
(start, submit, load, metrics_text, stop...), made through a deployment handle.

Each request is one streaming call to whichever replica Serve's router picks (the one with the shorter
queue of two); its items update the job here. Cancelling a job cancels the call, and the replica drops
the request at its next step. A replica that dies with requests in it fails them with 503
`engine_died`; a request it had not taken yet goes to another replica (once). Replicas report every
second (load, metrics); one silent for STALE_SECONDS counts as gone, and with none left the front-end reports
not ready until Serve has brought one back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import Future

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from ..contracts import EngineDied, GenerationFailed, Job, NotReady, QueueFull
from ..engine import messages as msg
from ..engine.client import IDLE, EngineEvents
from ..settings import Settings
from .messages import Finished, Report, Request, Update, mark
from .metrics import fleet_exposition

log = logging.getLogger(__name__)

STALE_SECONDS = 5.0  # a replica not heard from for this long is gone (it reports every second)
RETRIES = 1  # a request whose replica died before taking it goes to another replica once
TARGET_SECONDS = 5.0  # how often to ask Serve how many engine replicas it keeps


class FleetEngine:
    def __init__(self, settings: Settings, events: EngineEvents, handle, app: str, deployment: str):
        self.settings, self.events, self.handle = settings, events, handle
        self.app, self.deployment = app, deployment  # the engine deployment's names in Serve
        self._target: int | None = None  # engine replicas Serve keeps (running or starting)
        self._reports: dict[str, tuple[float, Report]] = {}  # replica -> (when heard, its last report)
        self._inflight: dict[Job, Future] = {}  # jobs sent to a replica and not answered yet
        self._lock = threading.Lock()  # _reports, _inflight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._started_at: float | None = None

    # ---- start-up and readiness ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()  # the app's lifespan calls this on its event loop
        threading.Thread(target=self._watch, name="fleet-watch", daemon=True).start()

    def _watch(self) -> None:
        """Wait for a first replica (it answers only once it has loaded and warmed up), then keep
        readiness in step with the replicas that report."""
        self.events.on_status("waiting for an engine replica")
        while not self._stopping:
            try:
                info, _ = self.handle.describe.remote().result(timeout_s=30)
                break
            except Exception as e:  # none is up yet, or the first one failed; Serve keeps trying
                log.info("no engine replica yet: %s", e)
        else:
            return
        self._started_at = time.monotonic()
        self.events.on_started(info)
        serving, asked = True, 0.0
        while not self._stopping:
            time.sleep(1.0)
            if time.monotonic() - asked > TARGET_SECONDS:
                asked = time.monotonic()
                self._target = self._serve_target()
            now = self._live()
            grace = time.monotonic() - self._started_at < STALE_SECONDS  # the first reports are on their way
            if bool(now) or grace:
                if not serving:
                    log.info("engine replicas reporting again: %s", ", ".join(r.replica for r in now))
                    self.events.on_capacity(True, "ready")
                serving = True
            elif serving:
                log.error("no engine replica has reported for %.0f s", STALE_SECONDS)
                self.events.on_capacity(False, "no engine replica is serving; Ray Serve is replacing them")
                serving = False

    def _serve_target(self) -> int | None:
        """The engine replicas Serve keeps, running or starting: its autoscaler's current target."""
        try:
            states = serve.status().applications[self.app].deployments[self.deployment].replica_states
        except Exception as e:  # the controller restarting: keep the last figure
            log.debug("could not read Serve's status: %s", e)
            return self._target
        return sum(n for state, n in states.items() if state != "STOPPING")

    def on_report(self, report: Report) -> None:
        with self._lock:
            self._reports[report.replica] = (time.monotonic(), report)

    def _live(self) -> list[Report]:
        now = time.monotonic()
        with self._lock:
            for name in [n for n, (heard, _) in self._reports.items() if now - heard > STALE_SECONDS]:
                del self._reports[name]
            return [report for _, report in self._reports.values()]

    # ---- requests --------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if self._stopping:
            raise NotReady("the server is shutting down and takes no new work")
        future = asyncio.run_coroutine_threadsafe(self._run(job), self._loop)
        with self._lock:
            self._inflight[job] = future
        job.on_cancel = lambda _, reason: future.cancel()

    async def _run(self, job: Job) -> None:
        try:
            for attempt in range(1 + RETRIES):
                if await self._attempt(job, last=attempt == RETRIES):
                    break
        finally:
            with self._lock:
                self._inflight.pop(job, None)
        if job.progress < job.spec.steps and not job.future.done():
            job.fail(GenerationFailed("the engine replica ended the request without an answer"))

    async def _attempt(self, job: Job, last: bool) -> bool:
        """One call to a replica; False when it may be tried again elsewhere (it died before it took it)."""
        now = time.monotonic()
        taken = False  # a replica has the request in its engine (it sent an update)
        stream = self.handle.options(stream=True).run.remote(
            Request(job.spec, job.deadline - now, job.owner, now - job.timings.arrival))
        try:
            async for item in stream:
                taken = True
                self._apply(job, item)
        except asyncio.CancelledError:
            stream.cancel()  # the replica drops it at its next step
            job.fail(job.ended_error())
        except BackPressureError:
            job.fail(QueueFull("every engine replica's queue is full; try again later", retry_after=self._drain()))
        except RayActorError as e:
            if not taken and not last:
                log.warning("an engine replica died before it took a request; sending it to another: %s", e)
                return False
            log.error("engine replica %s died with a request in it: %s", job.replica, e)
            job.fail(EngineDied(f"the engine replica {job.replica} stopped while it held this request; try again "
                                "(Ray Serve is replacing it)"))
        except RayTaskError as e:
            log.error("engine replica %s failed a request: %s", job.replica, e)
            job.fail(GenerationFailed(f"the engine replica failed: {e.cause!r}"))
        return True

    def _apply(self, job: Job, item) -> None:
        if isinstance(item, Update):
            job.replica = item.replica
            job.progress, job.queue_position = item.progress, item.queue_position
            job.timings.admitted = mark(item.admitted_age)
        elif isinstance(item, msg.Preview):
            job.preview = (item.step, item.pixels)  # one assignment: a stream reads a consistent pair
        elif isinstance(item, Finished):
            now = time.monotonic()
            t = job.timings
            t.admitted, t.denoised, t.decoded = (mark(a, now) for a in
                                                 (item.admitted_age, item.denoised_age, item.decoded_age))
            job.progress, job.queue_position = job.spec.steps, None
            self.events.deliver(job, item.pixels)
        elif isinstance(item, msg.Failed):
            job.fail(item.error())

    def arm_fault(self, kind: str, count: int) -> None:
        """Arms whichever replica the router picks (tests run one replica when they use faults)."""
        if not self.settings.fault_injection:
            raise ValueError("fault injection is off (start the server with --fault-injection)")
        self.handle.arm_fault.remote(kind, count).result(timeout_s=30)

    # ---- admission and metrics ---------------------------------------------------------------------------
    def load(self) -> msg.Load:
        """The load of an average replica: the requests this front-end has in the fleet, spread over the
        replicas that report, at the step times they measured. Exact counts, not the 1 s old reports: a
        burst must not overcommit between two reports. (Each replica checks its own queue again.)"""
        live = self._live()
        if not live:
            return IDLE
        with self._lock:
            jobs = list(self._inflight)
        waiting = sum(1 for job in jobs if job.timings.admitted is None)
        work = sum(job.spec.row_steps * (job.spec.steps - job.progress) // job.spec.steps for job in jobs)
        n = len(live)
        return msg.Load(waiting=math.ceil(waiting / n), work=math.ceil(work / n),
                        row_step_seconds=sum(r.load.row_step_seconds for r in live) / n,
                        step_seconds=sum(r.load.step_seconds for r in live) / n,
                        max_rows=min(r.load.max_rows for r in live))

    def _drain(self) -> float:
        load = self.load()
        return max(1.0, load.work / max(1, load.max_rows) * load.step_seconds)

    def metrics_text(self) -> bytes:
        return fleet_exposition(self._live(), self._target)

    # ---- stopping ----------------------------------------------------------------------------------------
    def begin_stop(self) -> None:
        self._stopping = True

    def stop(self, timeout: float | None = None) -> None:
        """Let the requests in the fleet finish (the replicas keep serving; Serve stops them)."""
        self._stopping = True
        deadline = time.monotonic() + (timeout or 0)
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight:
                    return
            time.sleep(0.1)
