"""The engine process: model runner + scheduler, away from the front-end's GIL.

`run(settings, conn)` is the child's main. It loads the model, warms up, starts the scheduler's engine
thread, and then serves the pipe: requests in, results out. Three threads, none of which the step
loop ever waits for:
  - the main thread reads the pipe (Submit, Cancel, ArmFault, Stop) and calls into the scheduler,
    which only appends to its inbox;
  - a sender thread writes every outgoing message, so a slow or saturated front-end never blocks the
    engine thread (it only appends to a queue);
  - a pump thread sends progress and queue positions (every 50 ms) and the metrics (every second).
The process dies with its parent (Linux PR_SET_PDEATHSIG, and a watch on the parent's pid), so no
orphan keeps the GPU.
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

from ..contracts import Job, OutputSpec, SchedulerError
from ..logs import setup_logging
from ..metrics import EngineMetrics
from ..settings import Settings
from . import messages as msg

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 0.05
METRICS_SECONDS = 1.0


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
    except OSError:
        pass  # not Linux: the pid watch below still ends us within a second


def run(settings: Settings, conn) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front-end decides when we stop (Stop message)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(settings.log_level, settings.log_format)
    parent = os.getppid()
    Engine(settings, conn, parent).serve()


class Engine:
    def __init__(self, settings: Settings, conn, parent: int):
        self.settings, self.conn, self.parent = settings, conn, parent
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}  # id -> the engine-side job
        self.ids: dict[Job, int] = {}
        self.sent: dict[int, tuple] = {}  # id -> (progress, queue position, admitted) last sent
        self.lock = threading.Lock()  # jobs/sent, shared by the pipe reader and the pump
        self.metrics = EngineMetrics()
        self.last_submit = 0
        self.scheduler = None
        self.runner = None

    def send(self, message) -> None:
        self.outbox.put(message)

    def _sender(self) -> None:
        while True:
            message = self.outbox.get()
            if message is None:
                return
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):
                os._exit(1)  # the front-end is gone: nothing to serve

    def serve(self) -> None:
        threading.Thread(target=self._sender, name="engine-sender", daemon=True).start()
        if not self._start():
            self.outbox.put(None)
            time.sleep(0.5)
            return
        threading.Thread(target=self._pump, name="engine-pump", daemon=True).start()
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(1)  # the front-end is gone
            if isinstance(message, msg.Submit):
                self._submit(message)
            elif isinstance(message, msg.Cancel):
                with self.lock:
                    job = self.jobs.get(message.id)
                if job is not None:
                    job.cancel(message.reason)
            elif isinstance(message, msg.ArmFault):
                if self.runner.faults is not None:
                    self.runner.faults.arm(message.kind, message.count)
            elif isinstance(message, msg.Stop):
                self.scheduler.stop()
                self._send_progress()
                self.outbox.put(None)
                return

    def _start(self) -> bool:
        from .runner import ModelRunner
        from .scheduler import Scheduler

        try:
            self.runner = runner = ModelRunner.start(self.settings, lambda text: self.send(msg.Status(text)))
        except Exception as e:
            log.exception("the engine could not start")
            self.send(msg.StartFailed(f"{type(e).__name__}: {e}"))
            return False
        self.metrics.describe_model(runner, self.settings.policy)
        self.scheduler = Scheduler(runner, self.settings, self.metrics, deliver=self._deliver,
                                   on_fatal=lambda reason: self.send(msg.Fatal(reason)), on_preview=self._preview)
        self.scheduler.start()
        self.send(msg.MetricsSnapshot(generate_latest(self.metrics.registry)))  # /metrics is whole once ready
        self.send(msg.Started(msg.EngineInfo.of(runner)))
        return True

    def _submit(self, m: msg.Submit) -> None:
        job = Job(m.spec, OutputSpec(), deadline=m.deadline, owner=m.owner)
        job.timings.arrival = m.arrival
        job.future.add_done_callback(lambda f, id=m.id, job=job: self._failed(id, job, f))
        with self.lock:
            self.jobs[m.id] = job
            self.ids[job] = m.id
        try:
            self.scheduler.submit(job)
        except SchedulerError as e:
            job.fail(e)
        self.last_submit = m.id

    def _deliver(self, job: Job, pixels) -> None:
        """On the engine thread: hand the pixels to the sender thread and return at once."""
        t = job.timings
        with self.lock:
            id_ = self.ids[job]
        self.send(msg.Done(id_, pixels, t.admitted, t.denoised, t.decoded))
        job.future.set_result(None)

    def _preview(self, job: Job, step: int, pixels) -> None:
        with self.lock:
            id_ = self.ids.get(job)
        if id_ is not None:
            self.send(msg.Preview(id_, step, pixels))

    def _failed(self, id_: int, job: Job, future) -> None:
        with self.lock:
            self.jobs.pop(id_, None)
            self.ids.pop(job, None)
            self.sent.pop(id_, None)
        error = future.exception()
        if error is not None:
            self.send(msg.Failed.of(id_, error, job.timings.admitted))

    def _pump(self) -> None:
        last_metrics = 0.0
        while True:
            time.sleep(PROGRESS_SECONDS)
            if os.getppid() != self.parent:
                os._exit(1)
            self._send_progress()
            now = time.monotonic()
            if now - last_metrics >= METRICS_SECONDS:
                last_metrics = now
                self.send(msg.MetricsSnapshot(generate_latest(self.metrics.registry)))

    def _send_progress(self) -> None:
        last_submit = self.last_submit  # read before the load: a submit in between is counted twice, not missed
        updates = []
        with self.lock:
            for id_, job in self.jobs.items():
                state = (job.progress, job.queue_position, job.timings.admitted)
                if self.sent.get(id_) != state:
                    self.sent[id_] = state
                    updates.append((id_, *state))
        self.send(msg.Progress(tuple(updates), self.scheduler.load(), last_submit))
