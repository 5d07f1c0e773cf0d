"""The server's life cycle: load the model and warm up off the event loop, then report ready;
on shutdown stop admitting and finish what was accepted."""

from __future__ import annotations

import logging
import threading
import time

from .metrics import Metrics
from .runner import ModelRunner
from .scheduler import Scheduler
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
            self.scheduler = Scheduler(r, s, self.metrics, on_fatal=self._fatal)
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
            log.exception("start-up failed; /readyz stays 503")

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
            log.info("scheduler drained in %.2f s", time.monotonic() - t0)
