"""The typed contracts between the HTTP layer, the scheduler and the model runner.

The HTTP layer builds a `GenerationSpec` (validated numbers, no HTTP) and wraps it in a `Job`; the
scheduler turns jobs into sample states for the runner and resolves each job's future with a
`GenerationResult` (encoded images, timings) or one of the errors below. Tensors never leave the
scheduler/runner side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np

from model.denoise import rows_per_iteration

ImageFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class GenerationSpec:
    class_id: int
    cfg_scale: float
    steps: int
    sampler: str
    seeds: tuple[int, ...]  # one per image
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guided iff lo <= t / 999 <= hi
    previews: bool = False  # send small images of the predicted x0 while denoising

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def timeline(self) -> tuple[int, ...]:
        """Forward-pass rows one image occupies at each of its steps (2 where guided, else 1)."""
        return rows_per_iteration(self.sampler, self.steps, self.cfg_scale, self.guidance_interval)

    @property
    def rows(self) -> int:
        """Forward-pass rows the request occupies at its widest step, all images in flight."""
        return self.num_images * max(self.timeline)

    @property
    def row_steps(self) -> int:
        """The request's whole cost: forward rows summed over every step of every image."""
        return self.num_images * sum(self.timeline)

    @property
    def mean_rows(self) -> float:
        """Forward rows the request occupies in an average step, all images in flight."""
        return self.row_steps / self.steps


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
    replica: str  # the engine replica that generated them (the X-Replica header)


class FinishReason(StrEnum):
    """Why a request ended; each is counted in dit_requests_finished_total{reason}."""

    FINISHED = "finished"  # its images were delivered to the front-end
    CANCELLED = "cancelled"  # the client cancelled it (DELETE /jobs/{id}) or went away
    TIMED_OUT = "timed_out"  # its deadline passed (504)
    REJECTED = "rejected"  # refused before it was admitted (queue full, not ready)
    FAILED = "failed"  # the model or the device failed it


@dataclass(eq=False)
class Job:
    """One request in the scheduler. `future` resolves (from any thread) to a GenerationResult."""

    spec: GenerationSpec
    output: OutputSpec
    deadline: float  # time.monotonic() value
    owner: str | None = None  # a hash of the caller's API key (never the key), None without keys
    replica: str | None = None  # the engine replica serving it, once one has it
    timings: Timings = field(default_factory=Timings)
    future: Future = field(default_factory=Future)
    progress: int = 0  # denoising steps done (by the job's slowest sample); written by the scheduler thread
    queue_position: int | None = None  # 1 = next to be admitted; None once admitted; written by the scheduler
    preview: tuple[int, np.ndarray] | None = None  # (step, (N, h, w, 3) uint8): the latest x0 preview
    on_cancel: Callable[[Job, FinishReason], None] | None = field(default=None, repr=False)
    _cancel_reason: FinishReason | None = field(default=None, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def status(self) -> str:
        """queued, running, encoding, done, failed, cancelled or timed_out."""
        if self.future.done():
            error = self.future.exception()
            if error is None:
                return "done"
            return error.reason.value if isinstance(error, (Cancelled, DeadlineExceeded)) else "failed"
        if self.cancelled:
            return self._cancel_reason.value
        if self.timings.admitted is None:
            return "queued"
        return "running" if self.progress < self.spec.steps else "encoding"

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Ask the scheduler to drop this job's samples at the next step (client gone, or `TIMED_OUT`)."""
        if not self._cancelled.is_set():
            self._cancel_reason = reason
            self._cancelled.set()
            if self.on_cancel is not None:  # an engine in another process learns of it by message
                self.on_cancel(self, reason)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def cancel_reason(self) -> FinishReason | None:
        return self._cancel_reason if self.cancelled else None

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def ended_error(self) -> SchedulerError:
        """The error that ends a cancelled job, or one whose deadline passed, by its reason and stage."""
        if self.cancel_reason == FinishReason.CANCELLED:
            return Cancelled("the client cancelled the request")
        if self.timings.admitted is None:
            return DeadlineExceeded("the request's deadline passed while it waited")
        return DeadlineExceeded("the request's deadline passed during generation")


class SchedulerError(Exception):
    """Base of the errors a job's future can raise; `status` is the HTTP status the API maps it to."""

    status = 500
    code = "internal_error"
    reason = FinishReason.FAILED
    retry_after: float | None = None


class QueueFull(SchedulerError):
    status, code, reason = 429, "queue_full", FinishReason.REJECTED

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(QueueFull):
    """Admitted now, the request could not finish before its deadline: come back when the backlog drains."""

    code = "overloaded"


class KeyQuotaExceeded(QueueFull):
    """This API key already has --max-requests-per-key requests queued or in flight."""

    code = "key_quota_exceeded"


class NotReady(SchedulerError):
    status, code, reason = 503, "not_ready", FinishReason.REJECTED
    retry_after = 5.0


class InvalidRequest(SchedulerError):
    status, code, reason = 422, "invalid_request", FinishReason.REJECTED


class DeadlineExceeded(SchedulerError):
    status, code, reason = 504, "deadline_exceeded", FinishReason.TIMED_OUT


class Cancelled(SchedulerError):
    """The client cancelled the request; a cancelled job's result answers 409 with this code."""

    status, code, reason = 409, "cancelled", FinishReason.CANCELLED


class EngineDied(SchedulerError):
    """The engine process ended while the request was in it; the server is restarting."""

    status, code, reason = 503, "engine_died", FinishReason.FAILED
    retry_after = NotReady.retry_after  # a restarting server is one not ready yet: the same advice


class GenerationFailed(SchedulerError):
    status, code = 500, "generation_failed"


def scheduler_error(kind: str, message: str, retry_after: float | None = None) -> SchedulerError:
    """Rebuild an error sent by name across the engine's process boundary."""
    known = (QueueFull, Overloaded, KeyQuotaExceeded, NotReady, InvalidRequest, DeadlineExceeded, Cancelled,
             GenerationFailed, EngineDied)
    cls = {c.__name__: c for c in known}.get(kind, GenerationFailed)
    error = cls(message, retry_after or 1.0) if issubclass(cls, QueueFull) else cls(message)
    if retry_after is not None:
        error.retry_after = retry_after
    return error
