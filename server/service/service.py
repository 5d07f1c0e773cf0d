"""The server's life cycle and its one door into the engine.

Start-up: the engine (its own process by default, `--engine thread` for the in-process reference, or a
Ray fleet) loads the model and warms up; the service reports ready when it says so. Every request goes
in through `submit`: admission at the front door (server/engine/admission.py), then the engine. The
engine's outputs come back pushed, on the transport's thread: each updates its job (progress, preview),
and an end is encoded here on a thread pool, off the engine, then resolves the job. Shutdown: stop
admitting at once, let the engine finish what it accepted. If the engine process dies, its requests
answer 503, readiness turns off at once and the server exits non-zero (`on_exit_failure`), so that an
orchestrator restarts it.
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

from ..engine.admission import Admission
from ..engine.metrics import EngineMetrics
from ..engine.request import ErrorKind, FinishReason, RequestError, RequestOutput, RequestStatus
from ..settings import Settings
from ..transport.local import LocalEngine
from ..transport.messages import EngineInfo
from ..transport.process import EngineProcess
from .datasets import Datasets
from .encoding import encode
from .job import Job
from .job_store import JobStore, store_url
from .metrics import Metrics
from .priority import lower_priority
from .requests import InvalidSettings, limit_problems, resolve_class

log = logging.getLogger(__name__)

EXIT_DELAY_SECONDS = 3.0  # between the engine's death and the server's exit


class Service:
    def __init__(self, settings: Settings, engine: Callable[[Service], object] | None = None,
                 shared_store: bool = False):
        """engine: makes the engine handle from the service (its events), e.g. a Ray fleet's
        (server/transport/ray/); by default the engine process, or a thread with `--engine thread`.
        shared_store: the job store is shared with other front-ends of a fleet (else another live server
        on it is refused)."""
        self.settings = settings
        self.metrics = Metrics()
        if engine is not None:
            self.engine = engine(self)
        elif settings.engine == "thread":
            self.engine = LocalEngine(settings, self, EngineMetrics(self.metrics.registry))
        else:
            self.engine = EngineProcess(settings, self)
        self.model: EngineInfo | None = None  # set once the engine has started
        # Async jobs: opened here, so that a store that cannot be used stops the server before it listens.
        self.jobs = JobStore(store_url(settings.job_store, settings.data_dir), settings.job_ttl, settings.max_jobs,
                             settings.max_jobs_per_key, shared=shared_store)
        self.datasets = Datasets(self, self.jobs.db, self.jobs.holder, settings.data_dir, ttl=settings.dataset_ttl,
                                 max_bytes=settings.max_dataset_bytes, max_per_key=settings.max_datasets_per_key,
                                 lease=self.jobs.lease, judge_data=settings.judge_data)
        self.admission = Admission(settings.max_queue, settings.max_requests_per_key, settings.deadline_admission)
        self.on_readiness: Callable[[bool, str], None] | None = None  # told every change (the probe port)
        self._status = "starting"
        self._ready = threading.Event()
        self._stopping = False
        self._started = False
        self._jobs: dict[str, Job] = {}  # jobs in the engine, by id
        self._owned: Counter[str | None] = Counter()  # jobs in the engine per API key hash
        self._lock = threading.Lock()  # _jobs, _owned
        self._encoder = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        # A dataset's chunks (16 images each) are encoded on a thread of their own: an interactive answer
        # never waits behind them for an encoder.
        self._background_encoder = ThreadPoolExecutor(1, thread_name_prefix="encode-background")
        # Called with the reason when the server cannot serve at all (the model cannot be loaded, the engine
        # died): the CLI then exits non-zero, so that an orchestrator sees it and restarts the server.
        self.on_exit_failure: Callable[[str], None] | None = None
        self.on_ready: Callable[[], None] | None = None  # called once, when the engine first reports ready

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, text: str) -> None:
        self._status = text
        if self.on_readiness is not None:
            self.on_readiness(self.ready, text)

    def start(self) -> None:
        self.metrics.queue_capacity.set(self.settings.max_queue)
        self.engine.start()
        if isinstance(self.engine, EngineProcess):
            lower_priority(self.settings.frontend_nice, self.settings.frontend_sched_idle)

    # ---- the way in ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Admit the job into the engine or raise the RequestError to answer (429, 503...) at once."""
        request = job.request
        try:
            if not self.ready:
                raise RequestError(ErrorKind.NOT_READY, f"not ready: {self.status}")
            with self._lock:
                owned = self._owned[request.owner]
            owned = max(owned, self.engine.owned(request.owner))  # a fleet's other front-ends' too
            self.admission.check(request, self.engine.load(), owned, time.time())
            self._enter(job)
        except RequestError as e:
            self.metrics.requests_finished.labels(reason=e.reason.value).inc()
            raise
        self.metrics.admitted.inc()

    def enter(self, job: Job) -> None:
        """Into the engine without admission: work this server decided on itself (a dataset's chunks)."""
        if not self.can_resume:
            raise RequestError(ErrorKind.NOT_READY, f"not ready: {self.status}")
        self._enter(job)

    def job(self, job_id: str) -> Job | None:
        """A job in the engine, by its id."""
        return self._jobs.get(job_id)

    def _enter(self, job: Job) -> None:
        request = job.request
        with self._lock:  # before the engine has it: its first output may come at once
            if not request.background:  # a dataset's chunks are not the key's interactive requests
                self._owned[request.owner] += 1
            self._jobs[request.id] = job
        job.replica = self.model.replica  # the engine's name (a fleet's names the replica that takes it)
        job.on_cancel = lambda reason: self.engine.cancel(request.id, reason)
        try:
            self.engine.submit(request)
        except BaseException:
            self._forget(job)
            raise

    def resume(self, claimed: list[Job]) -> None:
        """Submit again, in their order, the async jobs claimed from the store (pending, and held by no
        live front-end: the last process stopped or died with them, or this fleet lost a front-end). They
        were admitted once: no admission now. Ended ones (their webhook still to deliver) stay as they are."""
        runs = [job for job in claimed if not job.ended]
        for job in runs:
            self.jobs.hold(job)
            if self._stopping:  # SIGTERM while resuming: left free in the store for the next start
                self.jobs.defer(job)
                job.fail(RequestError(ErrorKind.NOT_READY, "the server is shutting down"))
                continue
            try:
                self._check_resumed(job)
                self._enter(job)
            except RequestError as e:
                job.fail(e)
        if runs:
            log.info("resumed %d async jobs from the job store %s", len(runs), self.jobs.where)

    @property
    def can_resume(self) -> bool:
        """Whether jobs claimed now would run (the engine serves and the server is not stopping)."""
        return self.ready and not self._stopping

    def _check_resumed(self, job: Job) -> None:
        """A job made by an earlier process: the model and limits it was checked against may have changed.
        The door's own checks (server/service/requests.py) say whether it can run here."""
        r, info = job.request, self.model.info
        if job.model != info.name:
            problems = [(None, f"it was made for the model {job.model!r}; this server serves {info.name!r}")]
        else:
            problems = limit_problems(self.settings, steps=r.steps, num_images=r.num_images,
                                      cfg_scale=r.sampling.cfg_scale)
            try:
                resolve_class(info, r.class_id, None)
            except InvalidSettings as e:
                problems += e.problems
        if problems:
            raise RequestError(ErrorKind.INVALID_REQUEST, f"job {job.id} cannot run again here: "
                               + "; ".join(message for _, message in problems))

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._jobs.pop(job.id, None) is None or job.request.background:
                return
            self._owned[job.request.owner] -= 1
            if self._owned[job.request.owner] <= 0:
                del self._owned[job.request.owner]

    def arm_fault(self, kind: str, count: int) -> None:
        self.engine.arm_fault(kind, count)

    def metrics_text(self) -> bytes:
        return self.engine.frontend_exposition(generate_latest(self.metrics.registry)) + self.engine.metrics_text()

    # ---- what the engine tells us (EngineEvents; from its threads) ----------------------------------
    def on_output(self, out: RequestOutput) -> None:
        with self._lock:
            job = self._jobs.get(out.id)
        if job is None:
            return
        r = job.request
        r.status, r.step, r.queue_position = out.status, out.step, out.queue_position
        if out.replica is not None:
            job.replica = out.replica
        if out.preview is not None:
            job.preview = (out.step, out.preview)  # one assignment: a stream reads a consistent pair
        if out.ended:
            self._forget(job)
            job.timings.update(out.timings or {})
            if out.error is not None:
                self._ended(job, out.error)
            else:
                r.step = r.steps
                encoder = self._background_encoder if r.background else self._encoder
                encoder.submit(self._encode, job, out.pixels)
        job.changed()

    def _encode(self, job: Job, pixels: np.ndarray) -> None:
        try:
            t0 = time.time()
            images = encode(pixels, job.request.seeds, job.format, separate=job.separate, parameters=job.parameters)
            now = time.time()
            self.metrics.encode_duration.observe(now - t0)
            job.timings.update(encode=now - t0, total=now - job.request.arrival)
            job.finish(images)
            self.metrics.requests_finished.labels(reason=FinishReason.FINISHED.value).inc()
        except Exception as e:
            log.exception("encoding failed")
            self._ended(job, RequestError(ErrorKind.GENERATION_FAILED, f"encoding failed: {type(e).__name__}: {e}"))

    def _ended(self, job: Job, error: RequestError) -> None:
        job.request.status = RequestStatus.FINISHED
        job.fail(error)
        self.metrics.requests_finished.labels(reason=error.reason.value).inc()

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
        if self.on_ready is not None:
            self.on_ready()

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
        """A fleet's engine replicas all gone, or one back (server/transport/ray/): readiness follows
        them, and the front-end stays up (Ray restarts replicas; nothing here would restart faster)."""
        if self._stopping or not self._started:
            return
        self.metrics.engine_up.set(int(serving))
        if serving:
            self._now_ready()
        else:
            self._not_ready(status)

    # ---- readiness and stopping ---------------------------------------------------------------------
    def _now_ready(self) -> None:
        self._ready.set()
        self.status = "ready"  # after the event: what it tells the probe port is ready
        self.metrics.ready.set(1)

    def _not_ready(self, status: str) -> None:
        self._ready.clear()
        self.metrics.ready.set(0)
        self.status = status

    def begin_shutdown(self) -> None:
        """On SIGTERM, before uvicorn drains connections: not ready at once, no new work admitted; async
        jobs still queued leave the engine and stay in the job store for the next start."""
        self._stopping = True
        self._not_ready("shutting down")
        self.datasets.stop()  # their chunks leave the engine; the datasets go on at the next start
        with self._lock:
            queued = [job for job in self._jobs.values() if job.request.status == RequestStatus.QUEUED]
        for job in queued:
            if self.jobs.defer(job):
                job.cancel(FinishReason.CANCELLED)
        self.engine.begin_stop()
        log.info("shutting down: readiness off, finishing admitted requests (%d queued async jobs left for the "
                 "next start)", sum(self.jobs.deferred(job) for job in queued))

    def shutdown(self) -> None:
        """Lifespan end (after uvicorn drained the connections): finish what was accepted."""
        self._stopping = True
        self._not_ready("shutting down")
        t0 = time.monotonic()
        self.engine.stop(timeout=self.settings.drain_timeout)
        self._encoder.shutdown(wait=True)
        self._background_encoder.shutdown(wait=True)
        self.jobs.close()
        log.info("engine drained in %.2f s", time.monotonic() - t0)
