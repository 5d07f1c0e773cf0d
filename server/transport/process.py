"""`EngineProcess` (the default): the front-end's handle on the engine in its own process, behind one
pipe (messages in server/transport/messages.py). A reader thread takes what the engine says and forwards
each output at once; it is also the only thread that waits for the process to exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading

from ..engine.request import EngineRequest, ErrorKind, FinishReason, RequestError
from ..settings import Settings
from . import engine_main
from . import messages as msg
from .handle import EngineEvents, EngineHandle

log = logging.getLogger(__name__)


class EngineProcess(EngineHandle):
    def __init__(self, settings: Settings, events: EngineEvents):
        super().__init__(settings, events)
        self._send_lock = threading.Lock()  # one writer on the pipe at a time
        self._metrics = b""
        self._stopping = False
        self._conn = None
        self._reader: threading.Thread | None = None
        self.proc = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main.run, args=(self.settings, child), name="dit-engine", daemon=True)
        self.proc.start()
        child.close()
        log.info("engine process %d started", self.proc.pid)
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def submit(self, request: EngineRequest) -> None:
        self._submitted(request)
        try:
            self._send(request)
        except (BrokenPipeError, OSError) as e:
            self.backlog.remove(request.id)
            raise RequestError(ErrorKind.ENGINE_DIED, "the engine process is gone; the server is restarting") from e

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        try:
            self._send(msg.Cancel(request_id, reason))
        except (BrokenPipeError, OSError):
            pass  # the engine is gone; its death ends the request

    def arm_fault(self, kind: str, count: int) -> None:
        if not self.settings.fault_injection:
            raise ValueError("fault injection is off (start the server with --fault-injection)")
        self._send(msg.ArmFault(kind, count))

    def metrics_text(self) -> bytes:
        return self._metrics

    def begin_stop(self) -> None:
        self._stopping = True

    def stop(self, timeout: float | None = None) -> None:
        """Let the engine finish what it admitted, then wait (on the reader) for it to exit."""
        self._stopping = True
        if self.proc is None or not self.proc.is_alive():
            return
        try:
            self._send(msg.Stop())
        except (BrokenPipeError, OSError):
            pass
        self._reader.join(timeout)
        if self._reader.is_alive():
            log.warning("the engine did not stop within %s s; killing it", timeout)
            self.proc.kill()
            self._reader.join(5)

    # ---- the reader thread --------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                messages = self._conn.recv()
            except (EOFError, OSError):
                break
            for m in messages:
                try:
                    self._handle(m)
                except Exception:  # a bug here must not stop results from flowing
                    log.exception("could not handle %s from the engine", type(m).__name__)
        self.proc.join(10)  # the pipe closed: the process is exiting (this thread alone reaps it)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        code = self.proc.exitcode
        if self._stopping and code == 0 and not len(self.backlog):
            return
        reason = f"the engine process exited (code {code})"
        lost = self._end_all(RequestError(ErrorKind.ENGINE_DIED, f"{reason}; the server is restarting, try again"))
        log.error("%s with %d requests in it", reason, lost)
        self.events.on_died(reason)

    def _handle(self, m) -> None:
        if isinstance(m, msg.MetricsSnapshot):
            self._metrics = m.text
        elif isinstance(m, msg.Status):
            self.events.on_status(m.text)
        elif isinstance(m, msg.Started):
            self._started(m.info)
        elif isinstance(m, msg.StartFailed):
            self._stopping = True  # the engine exits next; that is not a death to report
            self.events.on_start_failed(m.reason)
        elif isinstance(m, msg.Fatal):
            self.events.on_fatal(m.reason)
        else:
            self._forward(m)  # EngineOutputs
