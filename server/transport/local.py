"""`LocalEngine`: the engine on a thread of this process (`--engine thread`, the reference the engine
process is measured against; and each Ray engine replica). It reports through the same events as the
engine process, so the service above it does not know which it has.
"""

from __future__ import annotations

import logging
import threading

from ..engine.core import EngineCore
from ..engine.loop import EngineLoop
from ..engine.metrics import EngineMetrics
from ..engine.request import EngineRequest, ErrorKind, FinishReason, RequestError
from ..settings import Settings
from .handle import EngineEvents, EngineHandle
from .messages import EngineInfo

log = logging.getLogger(__name__)


class LocalEngine(EngineHandle):
    def __init__(self, settings: Settings, events: EngineEvents, metrics: EngineMetrics):
        super().__init__(settings, events)
        self.metrics = metrics
        self.runner = None
        self.loop: EngineLoop | None = None

    def start(self) -> None:
        threading.Thread(target=self.boot, name="model-loader", daemon=True).start()

    def boot(self, replica: str | None = None) -> None:
        """Load, warm up and start the engine thread here and now; report through the events."""
        from ..engine.runner import ModelRunner

        try:
            self.runner = runner = ModelRunner.start(self.settings, self.events.on_status)
        except Exception as e:
            log.exception("start-up failed")
            self.events.on_start_failed(f"{type(e).__name__}: {e}")
            return
        self.metrics.describe_model(runner, self.settings.policy)
        info = EngineInfo.of(runner, replica)
        core = EngineCore(runner, self.settings.policy, self.settings.max_batch_rows, self.metrics,
                          replica=info.replica)
        self.loop = EngineLoop(core, self._forward, on_fatal=self.events.on_fatal)
        self.loop.start()
        self._started(info)

    def submit(self, request: EngineRequest) -> None:
        if self.loop is None:
            raise RequestError(ErrorKind.NOT_READY, "the model is not loaded yet")
        self._submitted(request)
        try:
            self.loop.submit(request.fresh())
        except RequestError:
            self.backlog.remove(request.id)
            raise

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        if self.loop is not None:
            self.loop.cancel(request_id, reason)

    def arm_fault(self, kind: str, count: int) -> None:
        if self.runner is None or self.runner.faults is None:
            raise ValueError("fault injection is off (start the server with --fault-injection)")
        self.runner.faults.arm(kind, count)

    def problem(self) -> str | None:
        return self.loop.problem() if self.loop is not None else "the engine has not started"

    def metrics_text(self) -> bytes:
        return b""  # the engine's metrics are in the front-end's own registry

    def begin_stop(self) -> None:
        if self.loop is not None:
            self.loop.begin_stop()

    def stop(self, timeout: float | None = None) -> None:
        if self.loop is not None:
            self.loop.stop(timeout)
