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

from ..contracts import DeadlineExceeded, EngineDied, GenerationFailed, Job, NotReady, QueueFull
from ..engine import messages as msg
from ..engine.client import IDLE, EngineEvents, set_preview
from ..settings import Settings
from .messages import STALE_SECONDS, Finished, Report, Request, Update, to_clock
from .metrics import fleet_exposition

log = logging.getLogger(__name__)

RETRIES = 1  # a request whose replica died before taking it goes to another replica once
TARGET_SECONDS = 5.0  # how often to ask Serve how many engine replicas it keeps


class FleetEngine:
    def __init__(self, settings: Settings, events: EngineEvents, handle, app: str, deployment: str):
        self.settings, self.events, self.handle = settings, events, handle
        self.streams = handle.options(stream=True)  # each request's answer is a stream of items
        self.app, self.deployment = app, deployment  # the engine deployment's names in Serve
        self._target: int | None = None  # engine replicas Serve keeps (running or starting)
        self._reports: dict[str, tuple[float, Report]] = {}  # replica -> (when heard, its last report)
        self._inflight: dict[Job, None] = {}  # jobs sent to the replicas and not answered yet
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
            try:
                if time.monotonic() - asked > TARGET_SECONDS:
                    asked = time.monotonic()
                    self._target = self._serve_target()
                serving = self._follow_replicas(serving)
            except Exception:  # a bug here must not freeze readiness for good
                log.exception("watching the engine replicas failed")

    def _follow_replicas(self, serving: bool) -> bool:
        """Readiness off when no replica has reported for STALE_SECONDS, on again when one does."""
        live = self._live()
        grace = time.monotonic() - self._started_at < STALE_SECONDS  # the first reports are on their way
        if live or grace:
            if not serving:
                log.info("engine replicas reporting again: %s", ", ".join(r.replica for r in live))
                self.events.on_capacity(True, "ready")
            return True
        if serving:
            log.error("no engine replica has reported for %.0f s", STALE_SECONDS)
            self.events.on_capacity(False, "no engine replica is serving; Ray Serve is replacing them")
        return False

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

    def _heard(self, replica: str) -> None:
        """A stream item from a replica also says it is alive (its report may wait behind busy requests)."""
        with self._lock:
            if replica in self._reports:
                self._reports[replica] = (time.monotonic(), self._reports[replica][1])

    def _live(self) -> list[Report]:
        """The last reports of the replicas heard from lately (forgetting the others)."""
        now = time.monotonic()
        with self._lock:
            for name in [n for n, (heard, _) in self._reports.items() if now - heard > STALE_SECONDS]:
                del self._reports[name]
            return [report for _, report in self._reports.values()]

    # ---- requests --------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if self._stopping:
            raise NotReady("the server is shutting down and takes no new work")
        with self._lock:
            self._inflight[job] = None
        future = asyncio.run_coroutine_threadsafe(self._run(job), self._loop)
        future.add_done_callback(lambda f: self._ended(job, f))
        job.on_cancel = lambda _, reason: future.cancel()

    def _ended(self, job: Job, future: Future) -> None:
        """However the call ended (even cancelled before it started, or by a bug), the job is answered."""
        with self._lock:
            self._inflight.pop(job, None)
        if future.cancelled():
            job.fail(job.ended_error())
        elif future.exception() is not None:
            log.error("a request to the engine replicas failed", exc_info=future.exception())
            job.fail(GenerationFailed(f"{type(future.exception()).__name__}: {future.exception()}"))

    async def _run(self, job: Job) -> None:
        for attempt in range(1 + RETRIES):
            if await self._attempt(job, last=attempt == RETRIES):
                return

    async def _attempt(self, job: Job, last: bool) -> bool:
        """One call to a replica. False when the request may go to another replica: the one it reached died
        or refused it (queue full, broken) before taking it."""
        now = time.monotonic()
        job.replica = None
        taken = False  # the replica's engine holds the request (it sent an Update)
        stream = self.streams.run.remote(Request(job.spec, job.deadline - now, job.owner, now - job.timings.arrival))
        try:
            async with asyncio.timeout(job.deadline - now):  # the router's wait counts against the deadline too
                async for item in stream:
                    if isinstance(item, msg.Failed) and not taken and not last and item.retry_elsewhere:
                        log.info("engine replica refused a request (%s); sending it to another", item.kind)
                        return False
                    taken = taken or isinstance(item, Update)
                    self._apply(job, item)
        except asyncio.CancelledError:
            stream.cancel()  # the replica drops it at its next step
            raise  # _ended answers it with the job's own reason
        except TimeoutError:
            stream.cancel()
            job.fail(job.ended_error() if job.cancelled else DeadlineExceeded(
                "no result within the request timeout; ask for fewer steps or images, or try again later"))
        except BackPressureError:
            job.fail(QueueFull("every engine replica's queue is full; try again later",
                               retry_after=self.load().retry_after()))
        except RayActorError as e:
            stream.cancel()  # it may only be unreachable for now: let it drop the request if it still runs
            if not taken and not last:
                log.warning("an engine replica died before it took a request; sending it to another: %s", e)
                return False
            log.error("engine replica %s died with a request in it: %s", job.replica, e)
            job.fail(EngineDied(f"the engine replica {job.replica or '(not known)'} stopped while it held this "
                                "request; try again (Ray Serve is replacing it)"))
        except RayTaskError as e:
            log.error("engine replica %s failed a request: %s", job.replica, e)
            job.fail(GenerationFailed(f"the engine replica failed: {e.cause!r}"))
        if not job.future.done() and job.progress < job.spec.steps:
            job.fail(GenerationFailed("the engine replica ended the request without an answer"))
        return True

    def _apply(self, job: Job, item) -> None:
        if isinstance(item, Update):
            job.replica = item.replica
            self._heard(item.replica)
            job.progress, job.queue_position = item.progress, item.queue_position
            job.timings.admitted = to_clock(item.admitted_age)
        elif isinstance(item, msg.Preview):
            set_preview(job, item.step, item.pixels)
        elif isinstance(item, Finished):
            now = time.monotonic()
            t = job.timings
            t.admitted, t.denoised, t.decoded = (to_clock(a, now) for a in
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
        measured = [r for r in live if r.load.measured]  # a replica that just started knows no step time yet
        running = [job for job in jobs if job.progress < job.spec.steps]  # not those only being encoded
        rows = sum(job.spec.mean_rows for job in running)
        return msg.Load(waiting=math.ceil(waiting / n), work=math.ceil(work / n), rows=rows / n,
                        requests=math.ceil(len(running) / n), one_at_a_time=self.settings.policy == "none",
                        step_fixed=sum(r.load.step_fixed for r in measured) / max(1, len(measured)),
                        step_per_row=sum(r.load.step_per_row for r in measured) / max(1, len(measured)),
                        max_rows=min(r.load.max_rows for r in live))

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
