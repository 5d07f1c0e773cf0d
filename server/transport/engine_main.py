"""The engine process's main: model runner + engine core on the engine thread, away from the front-end's GIL.

`run(settings, conn)` loads the model, warms up, starts the engine loop, and then serves the pipe:
requests in, each step's outputs out. Three threads, none of which the step loop waits for:
  - the main thread reads the pipe (requests, Cancel, ArmFault, Stop) and hands them to the loop's inbox;
  - a sender thread writes everything the engine says, as lists of what is pending, so a slow front-end
    never blocks the step loop (which only appends to a queue);
  - a watch thread sends the metrics every second and ends the process when its parent is gone.
The process dies with its parent (Linux PR_SET_PDEATHSIG, and the watch), so no orphan keeps the GPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading
import time

from prometheus_client import generate_latest

from ..engine.core import EngineCore
from ..engine.loop import EngineLoop
from ..engine.metrics import EngineMetrics
from ..engine.request import EngineOutputs, EngineRequest, RequestError, RequestOutput
from ..logs import setup_logging
from ..settings import Settings
from . import messages as msg

log = logging.getLogger(__name__)

METRICS_SECONDS = 1.0


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
    except OSError:
        pass  # not Linux: the watch below still ends us within a second


def run(settings: Settings, conn) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front-end decides when we stop (Stop message)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(settings.log_level, settings.log_format)
    EngineServer(settings, conn, os.getppid()).serve()


class EngineServer:
    def __init__(self, settings: Settings, conn, parent: int):
        self.settings, self.conn, self.parent = settings, conn, parent
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.metrics = EngineMetrics()
        self.runner = None
        self.loop: EngineLoop | None = None

    def send(self, message) -> None:
        self.outbox.put(message)

    def _sender(self) -> None:
        while True:
            pending = [self.outbox.get()]
            while True:
                try:
                    pending.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            last = None in pending
            try:
                self.conn.send([m for m in pending if m is not None])
            except (BrokenPipeError, OSError):
                os._exit(1)  # the front-end is gone: nothing to serve
            if last:
                return

    def serve(self) -> None:
        sender = threading.Thread(target=self._sender, name="engine-sender", daemon=True)
        sender.start()
        if not self._start():
            self.outbox.put(None)
            sender.join(5)
            return
        threading.Thread(target=self._watch, name="engine-watch", daemon=True).start()
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(1)  # the front-end is gone
            if isinstance(message, EngineRequest):
                self._submit(message)
            elif isinstance(message, msg.Cancel):
                self.loop.cancel(message.id, message.reason)
            elif isinstance(message, msg.ArmFault):
                if self.runner.faults is not None:
                    self.runner.faults.arm(message.kind, message.count)
            elif isinstance(message, msg.Stop):
                self.loop.stop()
                self.send(msg.MetricsSnapshot(generate_latest(self.metrics.registry)))
                self.outbox.put(None)
                sender.join(5)
                return

    def _start(self) -> bool:
        from ..engine.runner import ModelRunner

        try:
            self.runner = runner = ModelRunner.start(self.settings, lambda text: self.send(msg.Status(text)))
        except Exception as e:
            log.exception("the engine could not start")
            self.send(msg.StartFailed(f"{type(e).__name__}: {e}"))
            return False
        self.metrics.describe_model(runner, self.settings.policy)
        info = msg.EngineInfo.of(runner)
        core = EngineCore(runner, self.settings.policy, self.settings.max_batch_rows, self.metrics,
                          replica=info.replica)
        self.loop = EngineLoop(core, self.send, on_fatal=lambda reason: self.send(msg.Fatal(reason)))
        self.loop.start()
        self.send(msg.MetricsSnapshot(generate_latest(self.metrics.registry)))  # /metrics is whole once ready
        self.send(msg.Started(info))
        return True

    def _submit(self, request: EngineRequest) -> None:
        try:
            self.loop.submit(request)
        except RequestError as e:  # stopping, or the device is unusable
            self.send(EngineOutputs((RequestOutput.failed(request.id, e),)))

    def _watch(self) -> None:
        while True:
            time.sleep(METRICS_SECONDS)
            if os.getppid() != self.parent:
                os._exit(1)
            self.send(msg.MetricsSnapshot(generate_latest(self.metrics.registry)))
