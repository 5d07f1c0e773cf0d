"""The server's life cycle: load the model and warm up off the event loop, then report ready;
on shutdown stop admitting and finish what was accepted."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .contracts import GenerationFailed, GenerationResult, Job
from .encoding import encode
from .engine.runner import ModelRunner
from .engine.scheduler import Scheduler
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self.status = "starting"
        self._ready = threading.Event()
        self._stopping = False
        self._encoder = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        # Called with the reason when loading or warm-up fails: the CLI then exits non-zero, so that an
        # orchestrator sees the failure instead of a process that stays up and never turns ready.
        self.on_start_failure: Callable[[str], None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            self.status = "loading model"
            self.runner = ModelRunner(self.settings)
            self.status = "preparing the fast path"
            self.runner.prepare_fast_path()
            if self.settings.warmup:
                self.status = "warming up"
                log.info("warm-up took %.2f s", self.runner.warmup())
            r, s = self.runner, self.settings
            self.metrics.model_info.labels(
                model=r.info.name, space=r.info.space, image_size=str(r.info.image_size), device=str(r.device),
                dtype=str(r.dtype).removeprefix("torch."), policy=s.policy,
            ).set(1)
            self.metrics.watch_cuda(r.device)
            self.scheduler = Scheduler(r, s, self.metrics, deliver=self._deliver, on_fatal=self._fatal)
            self.scheduler.start()
            self.metrics.queue_capacity.set(s.max_queue)
            if self._stopping:  # SIGTERM arrived while we were loading
                self.scheduler.begin_stop()
                return
            self.status = "ready"
            self._ready.set()
            self.metrics.ready.set(1)
            log.info("ready: serving %s with %s batching", r.info.name, s.policy)
        except Exception as e:
            self.status = f"failed: {type(e).__name__}: {e}"
            log.exception("start-up failed: %s: %s", type(e).__name__, e)
            if self.on_start_failure is not None:
                self.on_start_failure(f"{type(e).__name__}: {e}")

    def _deliver(self, job: Job, pixels: np.ndarray) -> None:
        """A finished request's pixels, from the engine thread: encode them on the pool (never there)."""
        self._encoder.submit(self._encode, job, pixels)

    def _encode(self, job: Job, pixels: np.ndarray) -> None:
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

    def _not_ready(self, status: str) -> None:
        self._ready.clear()
        self.metrics.ready.set(0)
        self.status = status

    def _fatal(self, reason: str) -> None:
        """The device is unusable: report not ready for good, so that the orchestrator restarts us."""
        self._not_ready(f"failed: {reason}; restart the server")

    def begin_shutdown(self) -> None:
        """On SIGTERM, before uvicorn drains connections: not ready at once, no new work admitted."""
        self._stopping = True
        self._not_ready("shutting down")
        if self.scheduler is not None:
            self.scheduler.begin_stop()
        log.info("shutting down: readiness off, finishing admitted requests")

    def shutdown(self) -> None:
        """Lifespan end (after uvicorn drained the connections): finish what was accepted."""
        self._stopping = True
        self._not_ready("shutting down")
        if self.scheduler is not None:
            t0 = time.monotonic()
            self.scheduler.stop()
            self._encoder.shutdown(wait=True)
            log.info("scheduler drained in %.2f s", time.monotonic() - t0)
