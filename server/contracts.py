"""The typed contracts between the HTTP layer, the scheduler and the model runner.

The HTTP layer builds a `GenerationSpec` (validated numbers, no HTTP) and wraps it in a `Job`; the
scheduler turns jobs into sample states for the runner and resolves each job's future with a
`GenerationResult` (encoded images, timings) or one of the errors below. Tensors never leave the
scheduler/runner side.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

ImageFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class GenerationSpec:
    class_id: int
    cfg_scale: float
    steps: int
    sampler: str
    seeds: tuple[int, ...]  # one per image

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def rows(self) -> int:
        """Forward-pass rows the request occupies while in flight: guided samples need a null-class twin."""
        return self.num_images * (2 if self.cfg_scale != 1.0 else 1)


@dataclass(frozen=True)
class OutputSpec:
    format: ImageFormat = "png"
    separate: bool = False  # one encoded image per sample (JSON answers) instead of one grid
    metadata: dict = field(default_factory=dict)  # written into PNG text chunks


@dataclass
class Timings:
    """Seconds, measured on the server (time.monotonic)."""

    arrival: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    denoised: float | None = None
    decoded: float | None = None
    encoded: float | None = None

    def durations(self) -> dict[str, float]:
        """queue, denoise, decode, encode and total, in seconds (missing stages are left out)."""
        marks = [("queue", self.arrival, self.admitted), ("denoise", self.admitted, self.denoised),
                 ("decode", self.denoised, self.decoded), ("encode", self.decoded, self.encoded),
                 ("total", self.arrival, self.encoded)]
        return {name: b - a for name, a, b in marks if a is not None and b is not None}


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    media_type: str
    seeds: tuple[int, ...]  # the seeds shown (all of them for a grid)


@dataclass(frozen=True)
class GenerationResult:
    images: list[EncodedImage]
    timings: dict[str, float]


@dataclass(eq=False)
class Job:
    """One request in the scheduler. `future` resolves (from any thread) to a GenerationResult."""

    spec: GenerationSpec
    output: OutputSpec
    deadline: float  # time.monotonic() value
    timings: Timings = field(default_factory=Timings)
    future: Future = field(default_factory=Future)
    progress: int = 0  # denoising steps done (by the job's slowest sample); written by the scheduler thread
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def status(self) -> str:
        """queued, running, encoding, done, failed or cancelled."""
        if self.future.done():
            error = self.future.exception()
            if error is None:
                return "done"
            return "cancelled" if isinstance(error, Cancelled) else "failed"
        if self.cancelled:
            return "cancelled"
        if self.timings.admitted is None:
            return "queued"
        return "running" if self.progress < self.spec.steps else "encoding"

    def cancel(self) -> None:
        """Ask the scheduler to drop this job's samples at the next step (client gone, deadline)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class SchedulerError(Exception):
    """Base of the errors a job's future can raise; `status` is the HTTP status the API maps it to."""

    status = 500
    code = "internal_error"
    retry_after: float | None = None


class QueueFull(SchedulerError):
    status, code = 429, "queue_full"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(SchedulerError):
    status, code = 503, "not_ready"
    retry_after = 5.0


class DeadlineExceeded(SchedulerError):
    status, code = 504, "deadline_exceeded"


class Cancelled(SchedulerError):
    status, code = 499, "cancelled"


class GenerationFailed(SchedulerError):
    status, code = 500, "generation_failed"
