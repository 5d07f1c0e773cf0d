"""The front-end's handle on the engine: `EngineProcess` (the default: the engine in its own process)
or `LocalEngine` (`--engine thread`: the same scheduler and runner on a thread of this process, the
reference the process is measured against). Both take the same calls and report through the same
callbacks (`EngineEvents`), so the service above them does not know which it has.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import threading
from collections import deque
from typing import Protocol

import numpy as np

from ..contracts import EngineDied, FinishReason, GenerationSpec, Job, NotReady
from ..metrics import EngineMetrics
from ..settings import Settings
from . import messages as msg
from . import process

log = logging.getLogger(__name__)


class EngineEvents(Protocol):
    """What the engine tells the service: called from the engine's threads (a fleet's front-end calls
    them on its event loop), so none may block."""

    def on_status(self, text: str) -> None: ...
    def on_started(self, info: msg.EngineInfo) -> None: ...
    def on_start_failed(self, reason: str) -> None: ...
    def on_fatal(self, reason: str) -> None: ...  # the device is unusable; the engine still answers
    def on_died(self, reason: str) -> None: ...  # the engine process is gone
    def on_capacity(self, serving: bool, status: str) -> None: ...  # a fleet's replicas all gone, or one back
    def deliver(self, job: Job, pixels: np.ndarray) -> None: ...


def set_preview(job: Job, step: int, pixels: np.ndarray) -> None:
    job.preview = (step, pixels)  # one assignment: a stream reads a consistent pair


IDLE = msg.Load(waiting=0, work=0, rows=0.0, requests=0, one_at_a_time=False, step_fixed=0.0, step_per_row=0.0,
                max_rows=1)  # before any step


class LocalEngine:
    """The engine on a thread of this process, sharing its registry of metrics."""

    def __init__(self, settings: Settings, events: EngineEvents, metrics: EngineMetrics):
        self.settings, self.events, self.metrics = settings, events, metrics
        self.runner = None
        self.scheduler = None

    def start(self) -> None:
        threading.Thread(target=self.boot, name="model-loader", daemon=True).start()

    def boot(self, replica: str | None = None) -> None:
        """Load, warm up and start the scheduler here and now; report through the events."""
        from .runner import ModelRunner
        from .scheduler import Scheduler

        try:
            self.runner = runner = ModelRunner.start(self.settings, self.events.on_status)
        except Exception as e:
            log.exception("start-up failed")
            self.events.on_start_failed(f"{type(e).__name__}: {e}")
            return
        self.metrics.describe_model(runner, self.settings.policy)
        self.scheduler = Scheduler(runner, self.settings, self.metrics, deliver=self.events.deliver,
                                   on_fatal=self.events.on_fatal, on_preview=set_preview)
        self.scheduler.start()
        self.events.on_started(msg.EngineInfo.of(runner, replica))

    def submit(self, job: Job) -> None:
        if self.scheduler is None:
            raise NotReady("the model is not loaded yet")
        self.scheduler.submit(job)

    def arm_fault(self, kind: str, count: int) -> None:
        if self.runner is None or self.runner.faults is None:
            raise ValueError("fault injection is off (start the server with --fault-injection)")
        self.runner.faults.arm(kind, count)

    def load(self) -> msg.Load:
        return self.scheduler.load() if self.scheduler is not None else IDLE

    def metrics_text(self) -> bytes:
        return b""  # the engine's metrics are in the front-end's own registry

    def begin_stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.begin_stop()

    def stop(self, timeout: float | None = None) -> None:
        if self.scheduler is not None:
            self.scheduler.stop(timeout)


class EngineProcess:
    """The engine in a child process, behind one pipe (messages in server/engine/messages.py)."""

    def __init__(self, settings: Settings, events: EngineEvents):
        self.settings, self.events = settings, events
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}  # in the engine, by id
        self._lock = threading.Lock()  # _jobs
        self._send_lock = threading.Lock()  # one writer on the pipe at a time
        self._load = IDLE
        self._unreported: deque[tuple[int, GenerationSpec]] = deque()  # submits not yet in _load
        self._unreported_work, self._unreported_rows = 0, 0.0  # their row-steps and mean rows
        self._metrics = b""
        self._stopping = False
        self._conn = None
        self.proc = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=process.run, args=(self.settings, child),
                                name="dit-engine", daemon=True)
        self.proc.start()
        child.close()
        log.info("engine process %d started", self.proc.pid)
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def submit(self, job: Job) -> None:
        id_ = next(self._ids)
        with self._lock:
            self._jobs[id_] = job
            self._unreported.append((id_, job.spec))
            self._unreported_work += job.spec.row_steps
            self._unreported_rows += job.spec.mean_rows
        job.on_cancel = lambda _, reason: self._cancel(id_, reason)
        try:
            self._send(msg.Submit(id_, job.spec, job.deadline, job.owner, job.timings.arrival))
        except (BrokenPipeError, OSError) as e:
            with self._lock:
                self._jobs.pop(id_, None)
            raise EngineDied("the engine process is gone; the server is restarting") from e

    def _cancel(self, id_: int, reason: FinishReason) -> None:
        try:
            self._send(msg.Cancel(id_, reason))
        except (BrokenPipeError, OSError):
            pass  # the engine is gone; its death fails the job

    def arm_fault(self, kind: str, count: int) -> None:
        if not self.settings.fault_injection:
            raise ValueError("fault injection is off (start the server with --fault-injection)")
        self._send(msg.ArmFault(kind, count))

    def load(self) -> msg.Load:
        """The engine's last reported load plus the requests submitted since (not in it yet)."""
        with self._lock:
            extra = len(self._unreported), self._unreported_work, self._unreported_rows
        load = self._load
        return dataclasses.replace(load, waiting=load.waiting + extra[0], work=load.work + extra[1],
                                   rows=load.rows + extra[2], requests=load.requests + extra[0])

    def metrics_text(self) -> bytes:
        return self._metrics

    def begin_stop(self) -> None:
        self._stopping = True

    def stop(self, timeout: float | None = None) -> None:
        """Let the engine finish what it admitted, then wait for it to exit."""
        self._stopping = True
        if self.proc is None or not self.proc.is_alive():
            return
        try:
            self._send(msg.Stop())
        except (BrokenPipeError, OSError):
            return
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("the engine did not stop within %s s; killing it", timeout)
            self.proc.kill()
            self.proc.join(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()

    # ---- the reader thread --------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                m = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._handle(m)
            except Exception:  # a bug here must not stop results from flowing
                log.exception("could not handle %s from the engine", type(m).__name__)
        self.proc.join(5)
        code = self.proc.exitcode
        with self._lock:
            orphans, self._jobs = list(self._jobs.values()), {}
        clean = self._stopping and code == 0
        if clean and not orphans:
            return
        reason = f"the engine process exited (code {code})"
        log.error("%s with %d requests in it", reason, len(orphans))
        for job in orphans:
            job.fail(EngineDied(f"{reason}; the server is restarting, try again"))
        self.events.on_died(reason)

    def _handle(self, m) -> None:
        if isinstance(m, msg.Progress):
            with self._lock:
                self._load = m.load
                while self._unreported and self._unreported[0][0] <= m.last_submit:
                    spec = self._unreported.popleft()[1]
                    self._unreported_work -= spec.row_steps
                    self._unreported_rows -= spec.mean_rows
                if not self._unreported:
                    self._unreported_rows = 0.0  # no float residue
                for id_, progress, position, admitted in m.updates:
                    job = self._jobs.get(id_)
                    if job is not None:
                        job.progress, job.queue_position, job.timings.admitted = progress, position, admitted
        elif isinstance(m, msg.Done):
            job = self._pop(m.id)
            if job is not None:
                t = job.timings
                t.admitted, t.denoised, t.decoded = m.admitted, m.denoised, m.decoded
                job.progress, job.queue_position = job.spec.steps, None
                self.events.deliver(job, m.pixels)
        elif isinstance(m, msg.Failed):
            job = self._pop(m.id)
            if job is not None:
                job.timings.admitted = m.admitted
                job.fail(m.error())
        elif isinstance(m, msg.Preview):
            with self._lock:
                job = self._jobs.get(m.id)
            if job is not None:
                set_preview(job, m.step, m.pixels)
        elif isinstance(m, msg.MetricsSnapshot):
            self._metrics = m.text
        elif isinstance(m, msg.Status):
            self.events.on_status(m.text)
        elif isinstance(m, msg.Started):
            self.events.on_started(m.info)
        elif isinstance(m, msg.StartFailed):
            self._stopping = True  # the engine exits next; that is not a death to report
            self.events.on_start_failed(m.reason)
        elif isinstance(m, msg.Fatal):
            self.events.on_fatal(m.reason)

    def _pop(self, id_: int) -> Job | None:
        with self._lock:
            return self._jobs.pop(id_, None)
