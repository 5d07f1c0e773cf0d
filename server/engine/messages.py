"""The messages between the front-end process and the engine process (pickled over one pipe).

    front-end -> engine:  Submit, Cancel, ArmFault, Stop
    engine -> front-end:  Status (loading...), Started (model facts), StartFailed, Progress (steps done,
                          queue positions, load), Preview (small x0 images), Done (a request's pixels),
                          Failed (a request's error),
                          MetricsSnapshot (the engine's Prometheus text), Fatal (the device is unusable)

Requests are named by an integer id the front-end chooses; futures and events never cross the pipe.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import numpy as np

from ..contracts import FinishReason, GenerationFailed, GenerationSpec, SchedulerError, scheduler_error


@dataclass(frozen=True)
class EngineInfo:
    """What the front-end needs to know about the loaded model (plain data)."""

    info: object  # model.ModelInfo: name, space, image_size, class names, defaults
    num_classes: int
    device: str
    dtype: str
    replica: str  # names this engine in the X-Replica header: host:pid, or the Ray Serve replica

    @classmethod
    def of(cls, runner, replica: str | None = None) -> EngineInfo:
        return cls(runner.info, runner.num_classes, str(runner.device), str(runner.dtype).removeprefix("torch."),
                   replica or f"{socket.gethostname()}:{os.getpid()}")


@dataclass(frozen=True)
class Submit:
    id: int
    spec: GenerationSpec
    deadline: float  # time.monotonic(): CLOCK_MONOTONIC is the same in every process of the machine
    owner: str | None
    arrival: float


@dataclass(frozen=True)
class Cancel:
    id: int
    reason: FinishReason


@dataclass(frozen=True)
class ArmFault:
    kind: str
    count: int


@dataclass(frozen=True)
class Stop:
    """Admit nothing more, finish what was accepted, then exit."""


@dataclass(frozen=True)
class Status:
    text: str


@dataclass(frozen=True)
class Started:
    info: EngineInfo


@dataclass(frozen=True)
class StartFailed:
    reason: str


@dataclass(frozen=True)
class Load:
    """The engine's backlog, for the front-end's admission decisions (see server/admission.py)."""

    waiting: int  # requests not yet fully admitted
    work: int  # sample-steps x rows queued or in flight, not yet computed
    # The width the backlog drains at. rows: the forward rows of the requests queued (each at its mean width)
    # and in flight (at their next step's rows), which continuous batching runs side by side, up to the
    # row budget; requests: how many they are, for --policy none, which runs them one at a time.
    rows: float
    requests: int
    one_at_a_time: bool
    step_fixed: float  # a step's measured wall time = step_fixed + step_per_row x rows (engine/step_cost.py)
    step_per_row: float  # (both 0 before the engine measured enough steps)
    max_rows: int  # the current row budget (halved after out-of-memory errors)

    @property
    def measured(self) -> bool:
        return self.step_fixed + self.step_per_row > 0

    def step_seconds(self, rows: float) -> float:
        return self.step_fixed + self.step_per_row * rows

    def drain_seconds(self, row_steps: float, extra_rows: float = 0.0, extra_requests: int = 0) -> float:
        """Seconds to compute `row_steps` of backlog, with `extra_rows` of `extra_requests` requests added
        to it. (Not at the width the engine ran recently: a burst that arrives at a quiet engine is served
        in wide steps, not in the narrow ones it ran before.)"""
        rows = self.rows + extra_rows
        if self.one_at_a_time:
            rows /= max(1, self.requests + extra_requests)  # the mean request, alone
        width = min(max(1.0, rows), max(1, self.max_rows))
        return row_steps / width * self.step_seconds(width)

    def retry_after(self) -> float:
        """Roughly when the backlog leaves room (a 429's Retry-After): its row-steps drained, >= 1 s."""
        return max(1.0, self.drain_seconds(self.work)) if self.measured else 1.0


@dataclass(frozen=True)
class Progress:
    updates: tuple[tuple[int, int, int | None, float | None], ...]  # (id, steps done, queue position, admitted)
    load: Load
    last_submit: int  # the id of the last Submit the engine had taken when `load` was read: later ones are
    #                   not in it yet, so the front-end adds them (admission must not overcommit between updates)


@dataclass(frozen=True)
class Done:
    id: int
    pixels: np.ndarray  # (N, H, W, 3) uint8
    admitted: float | None
    denoised: float | None
    decoded: float | None


@dataclass(frozen=True)
class Failed:
    id: int
    kind: str  # the name of a server.contracts SchedulerError subclass
    message: str
    retry_after: float | None
    admitted: float | None

    @classmethod
    def of(cls, id: int, error: BaseException, admitted: float | None) -> Failed:
        """Any error: one that is not the API's own (a SchedulerError) fails the request as generation_failed."""
        if not isinstance(error, SchedulerError):
            error = GenerationFailed(f"{type(error).__name__}: {error}")
        return cls(id, type(error).__name__, str(error), error.retry_after, admitted)

    def error(self) -> SchedulerError:
        return scheduler_error(self.kind, self.message, self.retry_after)

    @property
    def retry_elsewhere(self) -> bool:
        """Refused for a reason of this engine alone (its queue full, busy, broken): in a fleet another
        engine may take it."""
        return self.kind in ("QueueFull", "Overloaded", "NotReady")


@dataclass(frozen=True)
class Preview:
    id: int
    step: int
    pixels: np.ndarray  # (N, h, w, 3) uint8


@dataclass(frozen=True)
class MetricsSnapshot:
    text: bytes


@dataclass(frozen=True)
class Fatal:
    reason: str
