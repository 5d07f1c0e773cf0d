"""The front-end's handle on a fleet of engine replicas (Ray Serve): the calls of EngineProcess
(start, submit, cancel, load, metrics_text, stop...), made through a deployment handle.

Each request is one streaming call to whichever replica the router picks (the one with the shorter
queue of two; a dataset's chunk, its shard's replica: router.py); its items are the engine's
RequestOutputs, forwarded as they come. Cancelling a request
cancels the call, and the replica drops the request at its next step. A replica that dies with requests
in it fails them with 503 `engine_died`; a request it had not taken yet goes to another replica (once).
Replicas report every second (load, metrics, requests per API key); one silent for STALE_SECONDS counts
as gone, and with none left the front-end reports not ready until Serve has brought one back.

With several front-ends (`frontend_replicas`), each report reaches one of them, which writes it into the
shared job store (`dit_replicas`); every front-end reads them all from there each second. So each sees
the whole fleet: readiness, /metrics, and admission, which counts the larger of its own requests (exact)
and the replicas' reported backlog (every front-end's, up to a second old), and per-key quotas likewise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future

from prometheus_client import generate_latest
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from ...engine.backlog import Load
from ...engine.request import EngineOutputs, EngineRequest, ErrorKind, FinishReason, RequestError
from ...settings import Settings
from ..handle import EngineEvents, EngineHandle
from .messages import STALE_SECONDS, Report
from .metrics import fleet_exposition, labelled_exposition

log = logging.getLogger(__name__)

RETRIES = 1  # a request whose replica died before taking it goes to another replica once
TARGET_SECONDS = 5.0  # how often to ask Serve how many engine replicas it keeps


class FleetEngine(EngineHandle):
    def __init__(self, settings: Settings, events: EngineEvents, handle, app: str, deployment: str):
        super().__init__(settings, events)
        self.handle = handle
        self.streams = handle.options(stream=True)  # each request's answer is a stream of outputs
        self.app, self.deployment = app, deployment  # the engine deployment's names in Serve
        self._target: int | None = None  # engine replicas Serve keeps (running or starting)
        self._reports: dict[str, tuple[float, Report]] = {}  # replica -> (when heard, its last report)
        self._calls: dict[str, Future] = {}  # request id -> its call, until it has ended
        self._cancels: dict[str, FinishReason] = {}  # why a call was cancelled
        self._lock = threading.Lock()  # _reports, _calls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._started_at: float | None = None
        self.store = None  # the job store, when shared with other front-ends (reports go through it)
        self.registry = None  # this front-end's own metrics, shared through the store with the store

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
                if self.store is not None:
                    self._read_reports()
                    self._share_metrics()
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
        if self.store is not None:  # for the other front-ends (called off the event loop)
            try:
                self.store.put_report(report.replica, report.to_json())
            except Exception as e:  # the store away for a moment: this front-end still has it
                log.debug("could not share a replica's report: %s", e)

    def _share_metrics(self) -> None:
        try:
            self.store.put_metrics(generate_latest(self.registry))
        except Exception as e:
            log.debug("could not share this front-end's metrics: %s", e)

    def frontend_exposition(self, own: bytes) -> bytes:
        """Every front-end's series, labelled `frontend` (this one's fresh, the others' up to a second old)."""
        if self.store is None:
            return own
        try:
            others = self.store.frontend_metrics()
        except Exception as e:  # the store away: this front-end's own, still labelled
            log.debug("could not read the other front-ends' metrics: %s", e)
            others = []
        return labelled_exposition("frontend", [(self.store.holder, own), *others])

    def _read_reports(self) -> None:
        """The reports other front-ends heard (through the store), where newer than those heard here."""
        now_wall, now = self.store.now(), time.monotonic()  # the store's clock: the one reports are heard on
        try:
            rows = self.store.reports(since=now_wall - STALE_SECONDS)
        except Exception as e:
            log.debug("could not read the replicas' reports from the job store: %s", e)
            return
        with self._lock:
            for name, heard_wall, blob in rows:
                heard = now - (now_wall - heard_wall)
                if name not in self._reports or self._reports[name][0] < heard:
                    self._reports[name] = (heard, Report.from_json(blob))

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
    def submit(self, request: EngineRequest) -> None:
        if self._stopping:
            raise RequestError(ErrorKind.NOT_READY, "the server is shutting down and takes no new work")
        self._submitted(request)
        future = asyncio.run_coroutine_threadsafe(self._run(request), self._loop)
        with self._lock:
            self._calls[request.id] = future
        future.add_done_callback(lambda f: self._ended(request, f))

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        with self._lock:
            future = self._calls.get(request_id)
            if future is None:
                return  # ended already (a cancel while its images are encoded): nothing to keep
            self._cancels[request_id] = reason
        future.cancel()

    def _ended(self, request: EngineRequest, future: Future) -> None:
        """However the call ended (even cancelled before it started, or by a bug), the request ends."""
        with self._lock:
            self._calls.pop(request.id, None)
            reason = self._cancels.pop(request.id, FinishReason.CANCELLED)
        if future.cancelled():
            if reason == FinishReason.TIMED_OUT:
                self._end(request.id, RequestError(ErrorKind.DEADLINE_EXCEEDED, "no result within the request timeout"))
            else:
                self._end(request.id, RequestError(ErrorKind.CANCELLED, "the client cancelled the request"))
        elif future.exception() is not None:
            log.error("a request to the engine replicas failed", exc_info=future.exception())
            self._end(request.id, RequestError.of(future.exception()))
        else:
            self._end(request.id, RequestError(ErrorKind.GENERATION_FAILED, "the engine replica ended the "
                                               "request without an answer"))  # a no-op once it has ended

    async def _run(self, request: EngineRequest) -> None:
        for attempt in range(1 + RETRIES):
            request = await self._attempt(request, last=attempt == RETRIES)
            if request is None:
                return

    async def _attempt(self, request: EngineRequest, last: bool) -> EngineRequest | None:
        """One call to a replica. None once the request has ended; else the request to send to another
        replica: the one it reached died or refused it (queue full, busy, broken) before taking it."""
        taken, replica = False, None  # taken: the replica's engine holds the request (it said so)
        stream = self.streams.run.remote(request)
        try:
            async with asyncio.timeout(request.deadline - time.time()):  # the router's wait counts too
                async for output in stream:
                    error = output.error
                    if error is not None and not taken and not last and error.kind.retry_elsewhere:
                        log.info("engine replica refused a request (%s); sending it to another", error.kind)
                        # a shard's chunk without its shard: the router would send it to the same replica
                        # until Serve replaces that one (router.py), and the dataset retries only so often
                        return dataclasses.replace(request, affinity=None)
                    taken, replica = True, output.replica
                    self._heard(replica)
                    if output.ended and self.backlog.remove(request.id) is None:
                        continue  # it ended here first (a cancel that crossed this output): it ends once
                    self._forward(EngineOutputs((output,)))
        except asyncio.CancelledError:
            stream.cancel()  # the replica drops it at its next step
            raise  # _ended answers it with the cancel's own reason
        except TimeoutError:
            stream.cancel()
            self._end(request.id, RequestError(ErrorKind.DEADLINE_EXCEEDED, "no result within the request timeout; "
                                               "ask for fewer steps or images, or try again later"))
        except BackPressureError:
            self._end(request.id, RequestError(ErrorKind.QUEUE_FULL, "every engine replica's queue is full; try "
                                               "again later", retry_after=self.load().retry_after()))
        except RayActorError as e:
            stream.cancel()  # it may only be unreachable for now: let it drop the request if it still runs
            if not taken and not last:
                log.warning("an engine replica died before it took a request; sending it to another: %s", e)
                return request  # (the router moves a dead replica's shards on)
            log.error("engine replica %s died with a request in it: %s", replica, e)
            self._end(request.id, RequestError(ErrorKind.ENGINE_DIED, f"the engine replica {replica or '(not known)'} "
                                               "stopped while it held this request; try again (Ray Serve is "
                                               "replacing it)"))
        except RayTaskError as e:
            log.error("engine replica %s failed a request: %s", replica, e)
            self._end(request.id, RequestError(ErrorKind.GENERATION_FAILED, f"the engine replica failed: {e.cause!r}"))
        return None

    def arm_fault(self, kind: str, count: int) -> None:
        """Arms whichever replica the router picks (tests run one replica when they use faults)."""
        if not self.settings.fault_injection:
            raise ValueError("fault injection is off (start the server with --fault-injection)")
        self.handle.arm_fault.remote(kind, count).result(timeout_s=30)

    # ---- admission and metrics ---------------------------------------------------------------------------
    def load(self) -> Load:
        """The load of an average replica: the requests this front-end has in the fleet (exact, not the 1 s
        old reports: a burst must not overcommit between two reports), spread over the replicas that
        report, at the step times they measured. (Each replica checks its own queue again.)"""
        live = self._live()
        measured = [r.load for r in live if r.load.measured]  # a replica that just started knows no step time yet
        n = max(1, len(measured))
        estimate = (sum(m.step_fixed for m in measured) / n, sum(m.step_per_row for m in measured) / n)
        own = self.backlog.load(share=max(1, len(live)), estimate=estimate,
                                max_rows=min((r.load.max_rows for r in live), default=self.settings.max_batch_rows))
        if self.store is None or not live:
            return own
        # Other front-ends' requests are in the replicas' reports (with this one's, a second old): the
        # larger of the two views, per quantity, for the average replica.
        k = len(live)
        return dataclasses.replace(
            own, waiting=max(own.waiting, -(-sum(r.load.waiting for r in live) // k)),
            work=max(own.work, -(-sum(r.load.work for r in live) // k)),
            rows=max(own.rows, sum(r.load.rows for r in live) / k),
            requests=max(own.requests, -(-sum(r.load.requests for r in live) // k)))

    def owned(self, owner: str | None) -> int:
        return sum(r.owners.get(owner, 0) for r in self._live())

    def metrics_text(self) -> bytes:
        return fleet_exposition(self._live(), self._target)

    # ---- stopping ----------------------------------------------------------------------------------------
    def begin_stop(self) -> None:
        self._stopping = True

    def stop(self, timeout: float | None = None) -> None:
        """Let the requests in the fleet finish (the replicas keep serving; Serve stops them)."""
        self._stopping = True
        deadline = time.monotonic() + (timeout or 0)
        while time.monotonic() < deadline and len(self.backlog):
            time.sleep(0.1)
