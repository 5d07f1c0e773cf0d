"""An engine replica: one Ray Serve replica = one engine (engine core + model runner) = one device.

The constructor loads the model and warms up, so Serve routes nothing to a replica before it can
serve (Serve sends requests once the constructor has returned). Each request is one call of `run`,
whose answer is a stream of the engine's RequestOutputs for it (progress, previews, then its end), pushed
by the engine thread as each step ends. The step loop runs on the engine's own thread; this replica's
event loop only relays, and the HTTP load lands on the front-end's process, not here. Every second the
replica reports its load and its metrics to the front-end (`Report`). Serve's health check calls
`check_health`, which fails once the device is unusable or the engine thread has ended, and Serve then
replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator

from prometheus_client import generate_latest
from ray import serve

from ...engine.admission import Admission
from ...engine.metrics import EngineMetrics
from ...engine.request import EngineRequest, FinishReason, RequestError, RequestOutput
from ...logs import setup_logging
from ...settings import Settings
from ..local import LocalEngine
from ..messages import EngineInfo
from .messages import REPORT_SECONDS, Report

log = logging.getLogger(__name__)

RERUN_WAIT_STEPS = 300  # tenths of a second a request run again waits for its first run's end

class EngineReplica:
    async def __init__(self, settings: Settings, frontend: str):
        setup_logging(settings.log_level, settings.log_format)
        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_id.unique_id}"
        self.settings = settings
        self.metrics = EngineMetrics()  # this replica's own registry, reported to the front-end
        self.engine = LocalEngine(settings, self, self.metrics)
        self.info: EngineInfo | None = None
        self.failed: str | None = None
        self.fatal: str | None = None
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> its outputs, for its call
        self._owners: Counter[str | None] = Counter()  # requests in this replica per API key hash
        self._loop = asyncio.get_running_loop()
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

    def on_started(self, info: EngineInfo) -> None:
        self.info = info

    def on_start_failed(self, reason: str) -> None:
        self.failed = reason

    def on_fatal(self, reason: str) -> None:
        self.fatal = reason

    def on_died(self, reason: str) -> None:  # EngineEvents; only an engine process dies on its own
        self.fatal = reason

    def on_capacity(self, serving: bool, status: str) -> None:  # EngineEvents; only a fleet's front-end's
        pass

    def on_output(self, output: RequestOutput) -> None:
        self._loop.call_soon_threadsafe(self._route, output)

    def _route(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.id)
        if stream is not None:
            stream.put_nowait(output)

    # ---- called through deployment handles -----------------------------------------------------------
    async def run(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """One request: its outputs as the engine's steps produce them, until its end."""
        if request.id in self._streams:  # a job taken over from a front-end that died: its first run goes
            self.engine.cancel(request.id, FinishReason.CANCELLED)
            for _ in range(RERUN_WAIT_STEPS):  # its end comes at the engine's next step
                if request.id not in self._streams:
                    break
                await asyncio.sleep(0.1)
        stream = self._streams[request.id] = asyncio.Queue()
        counted = False  # in self._owners
        try:
            try:
                if not request.background:  # a dataset's chunk waits for free rows instead of a 429
                    self.admission.check(request, self.engine.load(), 0, time.time())
                self.engine.submit(request)
            except RequestError as e:
                yield RequestOutput.failed(request.id, e, replica=self.name)
                return
            counted = not request.background  # per-key quotas are for interactive requests
            if counted:
                self._owners[request.owner] += 1
            while True:
                output = await stream.get()
                yield output
                if output.ended:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            # the front-end cancelled the call: the client went away or the deadline passed (unless a run
            # of the same request again has taken its place: that one is not this call's to cancel)
            if self._streams.get(request.id) is stream:
                self.engine.cancel(request.id, FinishReason.CANCELLED)
            raise
        finally:
            if self._streams.get(request.id) is stream:
                del self._streams[request.id]
            if counted:
                self._owners[request.owner] -= 1

    def describe(self) -> tuple[EngineInfo, int]:
        """The model facts, and this replica's process id (tests kill it by that)."""
        return self.info, os.getpid()

    def arm_fault(self, kind: str, count: int) -> None:
        self.engine.arm_fault(kind, count)

    def check_health(self) -> None:
        problem = self.fatal or self.engine.problem()
        if problem:
            raise RuntimeError(f"engine replica {self.name} cannot serve: {problem}")

    # ---- reporting and stopping ----------------------------------------------------------------------
    async def _report_forever(self) -> None:
        """Every second, until the device is unusable (then the front-end stops counting on this replica,
        while Serve's health checks replace it)."""
        while not self.fatal:
            try:
                report = Report(self.name, self.engine.load(), generate_latest(self.metrics.registry),
                                +self._owners)  # + keeps the keys with requests in
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
