"""The server's life cycle and its one door into the engine.

Start-up: the engine (its own process by default, `--engine thread` for the in-process reference)
loads the model and warms up; the service reports ready when it says so. Every request goes in through
`submit`: admission at the front door (server/admission.py), then the engine. Results come back as
pixels and are encoded here on a thread pool, off the engine. Shutdown: stop admitting at once, let the
engine finish what it accepted. If the engine process dies, its requests answer 503, readiness turns
off at once and the server exits non-zero (`on_exit_failure`), so that an orchestrator restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import generate_latest

from .admission import Admission
from .contracts import FinishReason, GenerationFailed, GenerationResult, Job, NotReady, SchedulerError
from .encoding import encode
from .engine.client import EngineProcess, LocalEngine
from .engine.messages import EngineInfo
from .metrics import EngineMetrics, Metrics
from .priority import lower_priority
from .settings import Settings

log = logging.getLogger(__name__)

EXIT_DELAY_SECONDS = 3.0  # between the engine's death and the server's exit


class Service:
    def __init__(self, settings: Settings, engine: Callable[[Service], object] | None = None):
        """engine: makes the engine handle from the service (its events), e.g. a Ray fleet's
        (server/fleet/); by default the engine process, or a thread with `--engine thread`."""
        self.settings = settings
        self.metrics = Metrics()
        if engine is not None:
            self.engine = engine(self)
        elif settings.engine == "thread":
            self.engine = LocalEngine(settings, self, EngineMetrics(self.metrics.registry))
        else:
            self.engine = EngineProcess(settings, self)
        self.model: EngineInfo | None = None  # set once the engine has started
        self.admission = Admission(settings.max_queue, settings.max_requests_per_key, settings.deadline_admission)
        self.status = "starting"
        self._ready = threading.Event()
        self._stopping = False
        self._started = False
        self._owned: Counter[str | None] = Counter()  # requests in the engine per API key hash
        self._owned_lock = threading.Lock()
        self._encoder = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        # Called with the reason when the server cannot serve at all (the model cannot be loaded, the engine
        # died): the CLI then exits non-zero, so that an orchestrator sees it and restarts the server.
        self.on_exit_failure: Callable[[str], None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        self.metrics.queue_capacity.set(self.settings.max_queue)
        self.engine.start()
        if isinstance(self.engine, EngineProcess):
            lower_priority(self.settings.frontend_nice, self.settings.frontend_sched_idle)

    # ---- the way in ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Admit the job into the engine or raise the error to answer (429, 503...) at once."""
        try:
            if not self.ready:
                raise NotReady(f"not ready: {self.status}")
            with self._owned_lock:
                owned = self._owned[job.owner]
            self.admission.check(job, self.engine.load(), owned, time.monotonic())
            with self._owned_lock:
                self._owned[job.owner] += 1
            job.replica = self.model.replica  # the engine's name (a fleet's names the replica that takes it)
            try:
                self.engine.submit(job)
            except BaseException:
                self._release(job)
                raise
        except SchedulerError as e:
            self.metrics.requests_finished.labels(reason=e.reason.value).inc()
            raise
        self.metrics.admitted.inc()
        job.future.add_done_callback(lambda _: self._ended(job))

    def _ended(self, job: Job) -> None:
        self._release(job)
        error = job.future.exception()
        reason = FinishReason.FINISHED if error is None else getattr(error, "reason", FinishReason.FAILED)
        self.metrics.requests_finished.labels(reason=reason.value).inc()

    def _release(self, job: Job) -> None:
        with self._owned_lock:
            self._owned[job.owner] -= 1
            if self._owned[job.owner] <= 0:
                del self._owned[job.owner]

    def arm_fault(self, kind: str, count: int) -> None:
        self.engine.arm_fault(kind, count)

    def metrics_text(self) -> bytes:
        return generate_latest(self.metrics.registry) + self.engine.metrics_text()

    # ---- what the engine tells us (EngineEvents; from its threads) ----------------------------------
    def on_status(self, text: str) -> None:
        if not self._started:
            self.status = text

    def on_started(self, info: EngineInfo) -> None:
        self.model = info
        self._started = True
        self.metrics.engine_up.set(1)
        if self._stopping:  # SIGTERM arrived while we were loading
            self.engine.begin_stop()
            return
        self._now_ready()
        log.info("ready: serving %s with %s batching (engine: %s)", info.info.name, self.settings.policy,
                 type(self.engine).__name__)

    def on_start_failed(self, reason: str) -> None:
        self.status = f"failed: {reason}"
        log.error("start-up failed: %s", reason)
        if self.on_exit_failure is not None:
            self.on_exit_failure(reason)

    def on_fatal(self, reason: str) -> None:
        """The device is unusable: report not ready for good, so that the orchestrator restarts us."""
        self._not_ready(f"failed: {reason}; restart the server")

    def on_died(self, reason: str) -> None:
        """Its requests have already failed (503). Readiness turns off now; the exit comes a little later,
        so that those answers go out and load balancers see the 503 before the port closes."""
        self.metrics.engine_up.set(0)
        self._not_ready(f"failed: {reason}; restarting")
        if self.on_exit_failure is not None:
            threading.Timer(EXIT_DELAY_SECONDS, self.on_exit_failure, args=(reason,)).start()

    def on_capacity(self, serving: bool, status: str) -> None:
        """A fleet's engine replicas all gone, or one back (server/fleet/): readiness follows them, and
        the front-end stays up (Ray restarts replicas; nothing here would restart faster)."""
        if self._stopping or not self._started:
            return
        self.metrics.engine_up.set(int(serving))
        if serving:
            self._now_ready()
        else:
            self._not_ready(status)

    def deliver(self, job: Job, pixels: np.ndarray) -> None:
        """A finished request's pixels: encode them on the pool (never on the engine's threads)."""
        self._encoder.submit(self._encode, job, pixels)

    def _encode(self, job: Job, pixels: np.ndarray) -> None:
        try:
            t0 = time.monotonic()
            images = encode(pixels, job.spec.seeds, job.output)
            job.timings.encoded = time.monotonic()
            self.metrics.encode_duration.observe(job.timings.encoded - t0)
            if not job.future.done():
                job.future.set_result(GenerationResult(images, job.timings.durations(), job.replica))
        except Exception as e:
            log.exception("encoding failed")
            job.fail(GenerationFailed(f"encoding failed: {type(e).__name__}: {e}"))

    # ---- stopping -----------------------------------------------------------------------------------
    def _now_ready(self) -> None:
        self.status = "ready"
        self._ready.set()
        self.metrics.ready.set(1)

    def _not_ready(self, status: str) -> None:
        self._ready.clear()
        self.metrics.ready.set(0)
        self.status = status

    def begin_shutdown(self) -> None:
        """On SIGTERM, before uvicorn drains connections: not ready at once, no new work admitted."""
        self._stopping = True
        self._not_ready("shutting down")
        self.engine.begin_stop()
        log.info("shutting down: readiness off, finishing admitted requests")

    def shutdown(self) -> None:
        """Lifespan end (after uvicorn drained the connections): finish what was accepted."""
        self._stopping = True
        self._not_ready("shutting down")
        t0 = time.monotonic()
        self.engine.stop(timeout=self.settings.drain_timeout)
        self._encoder.shutdown(wait=True)
        log.info("scheduler drained in %.2f s", time.monotonic() - t0)
