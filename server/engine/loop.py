"""`EngineLoop`: the engine's own thread, which calls `EngineCore.step()` while there is work and hands
each step's outputs to a sink; other threads talk to it only through an inbox (submitting never waits
for a step). The engine process, `--engine thread` and a Ray replica each run one, with their own sink
(the pipe, the front-end's handler, the replica's streams).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from .core import EngineCore
from .request import EngineOutputs, EngineRequest, ErrorKind, FinishReason, RequestError, RequestOutput

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, core: EngineCore, sink: Callable[[EngineOutputs], None],
                 on_fatal: Callable[[str], None] = lambda reason: None):
        self.core, self.sink, self.on_fatal = core, sink, on_fatal
        self._inbox: deque[EngineRequest | tuple[str, FinishReason]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- from any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: EngineRequest) -> None:
        if self._stopping or self.core.broken:
            raise RequestError(ErrorKind.NOT_READY, self.core.broken or "the server is shutting down and takes no "
                               "new work")
        self._inbox.append(request)
        self._wake.set()

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        self._inbox.append((request_id, reason))
        self._wake.set()

    def problem(self) -> str | None:
        """Why this engine cannot serve (a device error, its thread gone), or None: a health check."""
        if self.core.broken:
            return self.core.broken
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine thread ended"
        return None

    def begin_stop(self) -> None:
        """Refuse new requests at once (SIGTERM); the engine keeps finishing what it has."""
        self._stopping = True
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued and in-flight requests, then end the engine thread."""
        self.begin_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.core.broken:
            self._wake.clear()  # before draining: a submit after the drain sets it again
            self._drain()
            if self.core.has_work:
                try:
                    outputs = self.core.step()
                    if outputs.outputs or outputs.cycle is not None:
                        self.sink(outputs)
                except Exception as e:  # a bug: no request may wait forever on a thread that has ended
                    log.exception("the engine loop failed")
                    self.sink(self.core.fail_everything(f"the engine failed: {type(e).__name__}: {e}"))
                if self.core.broken:
                    self.on_fatal(self.core.broken)
                continue
            if self._stopping and not self._inbox:
                return
            self._wake.wait()
        self._refuse_the_rest()

    def _drain(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, EngineRequest):
                self.core.add(item)
            else:
                self.core.abort(*item)

    def _refuse_the_rest(self) -> None:
        """Broken: requests submitted after the last step end at once."""
        error = RequestError(ErrorKind.NOT_READY, self.core.broken)
        ended = []
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, EngineRequest):
                ended.append(RequestOutput.failed(item.id, error, replica=self.core.replica))
        if ended:
            self.sink(EngineOutputs(tuple(ended)))
