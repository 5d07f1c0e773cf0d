"""The engine's request: one type from admission to retirement, named by one id end to end.

The front-end builds an `EngineRequest` at the door (settings validated there, once), keeps it inside its
job, and sends it as it is through the engine process's pipe or a Ray handle; the engine trusts it. The
engine reports on it only through `RequestOutput`s (what `EngineCore.step()` returns): progress, a
preview, or its end (pixels and timings, or an error kind with its finish reason). Errors are kinds, not
HTTP statuses: the HTTP layer maps a kind to a status in one table (server/http/errors.py).

Clocks: `arrival` and `deadline` are wall-clock readings (time.time()), which mean the same in every
process and, with synchronised clocks (NTP), on every host of a Ray cluster; the durations an engine
measures (queue, denoise, decode) travel as seconds, never as readings of its own clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import numpy as np

from model.denoise import rows_per_iteration
from model.samplers import Sampling


class RequestStatus(StrEnum):
    QUEUED = "queued"  # waiting for admission into the batch
    RUNNING = "running"  # at least one of its samples is in the batch
    FINISHED = "finished"  # ended: see its FinishReason


class FinishReason(StrEnum):
    """Why a request ended; each is counted in dit_requests_finished_total{reason}."""

    FINISHED = "finished"  # its images were delivered
    CANCELLED = "cancelled"  # the client cancelled it (DELETE /jobs/{id}) or went away
    TIMED_OUT = "timed_out"  # its deadline passed
    REJECTED = "rejected"  # refused before it was admitted (queue full, not ready, invalid)
    FAILED = "failed"  # the model, the device or the engine failed it


class ErrorKind(StrEnum):
    """What went wrong, as the engine and the service say it (no HTTP here)."""

    QUEUE_FULL = "queue_full"
    OVERLOADED = "overloaded"  # it could not finish before its deadline: come back when the backlog drains
    KEY_QUOTA_EXCEEDED = "key_quota_exceeded"  # its API key has --max-requests-per-key in the engine
    NOT_READY = "not_ready"  # loading, stopping, or the device is unusable
    INVALID_REQUEST = "invalid_request"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    ENGINE_DIED = "engine_died"  # the engine (process or replica) ended while it held the request
    GENERATION_FAILED = "generation_failed"

    @property
    def reason(self) -> FinishReason:
        return _REASONS.get(self, FinishReason.FAILED)

    @property
    def retry_elsewhere(self) -> bool:
        """Refused for a reason of one engine alone (its queue full, busy, broken): in a fleet another may take it."""
        return self in (ErrorKind.QUEUE_FULL, ErrorKind.OVERLOADED, ErrorKind.NOT_READY)


_REASONS = {
    ErrorKind.QUEUE_FULL: FinishReason.REJECTED, ErrorKind.OVERLOADED: FinishReason.REJECTED,
    ErrorKind.KEY_QUOTA_EXCEEDED: FinishReason.REJECTED, ErrorKind.NOT_READY: FinishReason.REJECTED,
    ErrorKind.INVALID_REQUEST: FinishReason.REJECTED, ErrorKind.DEADLINE_EXCEEDED: FinishReason.TIMED_OUT,
    ErrorKind.CANCELLED: FinishReason.CANCELLED,
}
NOT_READY_RETRY_SECONDS = 5.0  # a server that is loading or restarting: the advice of not_ready and engine_died


class RequestError(Exception):
    """A request's end without images, or its refusal; plain data, so it crosses the pipe and Ray as it is."""

    def __init__(self, kind: ErrorKind, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.message, self.retry_after = ErrorKind(kind), message, retry_after
        if retry_after is None and self.kind in (ErrorKind.NOT_READY, ErrorKind.ENGINE_DIED):
            self.retry_after = NOT_READY_RETRY_SECONDS

    def __reduce__(self):
        return RequestError, (self.kind, self.message, self.retry_after)

    @property
    def reason(self) -> FinishReason:
        return self.kind.reason

    @classmethod
    def of(cls, error: BaseException) -> RequestError:
        """Any exception as a request's error: one that is not ours fails the request as generation_failed."""
        if isinstance(error, RequestError):
            return error
        return cls(ErrorKind.GENERATION_FAILED, f"{type(error).__name__}: {error}")


@dataclass(eq=False)
class EngineRequest:
    """One generation request. The first block is set at the door and never changes; the status block
    is the engine's (the front-end's copy mirrors it from outputs); the last block is the scheduler's own
    bookkeeping, per request (never per step per sample), left at its defaults everywhere else."""

    id: str
    class_id: int
    seeds: tuple[int, ...]  # one per image
    sampling: Sampling  # sampler, steps, cfg_scale, guidance_interval: validated at the door
    arrival: float  # wall clock (time.time())
    deadline: float  # wall clock
    owner: str | None = None  # a hash of the caller's API key (never the key), None without keys
    previews: bool = False  # send small images of the predicted x0 while denoising
    background: bool = False  # a dataset's work: its samples join only when no interactive request waits
    affinity: str | None = None  # requests with one affinity go to one engine replica (a dataset's shard)

    status: RequestStatus = RequestStatus.QUEUED
    step: int = 0  # denoising steps done by its slowest sample (0 until all its samples are admitted)
    queue_position: int | None = None  # 1 = next to be admitted; None once admitted

    admitted: int = field(default=0, repr=False)  # samples admitted so far
    slots: list[int] = field(default_factory=list, repr=False)  # its admitted, unfinished samples' slots
    last_join_tick: int = field(default=0, repr=False)  # the step its last admitted sample first ran in
    admitted_at: float | None = field(default=None, repr=False)  # wall clock
    last_preview: float = field(default=float("-inf"), repr=False)
    pixels: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # sample index -> (H, W, 3) uint8

    def fresh(self) -> EngineRequest:
        """A copy as it left the door, for an engine in this same process (a pipe or Ray copies anyway)."""
        return EngineRequest(self.id, self.class_id, self.seeds, self.sampling, self.arrival, self.deadline,
                             self.owner, self.previews, self.background, self.affinity)

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def steps(self) -> int:
        return self.sampling.steps

    @cached_property  # read at every step of the request (the backlog, the slots): derived once
    def timeline(self) -> tuple[int, ...]:
        """Forward rows one image occupies at each of its steps (2 where guided, else 1; 0 where its step cache
        skips the network: the cache's schedule is fixed, so this is exact)."""
        s = self.sampling
        return rows_per_iteration(s.sampler, s.steps, s.cfg_scale, s.guidance_interval, s.cache)

    @property
    def sample_work(self) -> int:
        """One image's row-steps: its forward rows summed over its steps."""
        return sum(self.timeline)

    @property
    def row_steps(self) -> int:
        """The request's whole cost: forward rows summed over every step of every image."""
        return self.num_images * self.sample_work

    @property
    def mean_rows(self) -> float:
        """Forward rows the request occupies in an average step, all images in flight."""
        return self.row_steps / self.steps


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one engine step says about one request: its progress, a preview, or its end. An end has
    `pixels` (finished) or `error`; `timings` then holds the engine's durations in seconds (queue,
    denoise, decode)."""

    id: str
    status: RequestStatus
    step: int
    queue_position: int | None = None
    preview: np.ndarray | None = None  # (N, h, w, 3) uint8: the predicted x0, small
    pixels: np.ndarray | None = None  # (N, H, W, 3) uint8, at the end
    error: RequestError | None = None
    timings: dict[str, float] | None = None
    replica: str | None = None  # the engine that produced it (the X-Replica header), where the transport says

    @property
    def ended(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @classmethod
    def failed(cls, request_id: str, error: RequestError, step: int = 0, replica: str | None = None) -> RequestOutput:
        """The end of a request that gets no images (refused, or lost with its engine)."""
        return cls(request_id, RequestStatus.FINISHED, step, error=error, replica=replica)


@dataclass(frozen=True, slots=True)
class EngineOutputs:
    """One step's outputs, and what the step cost (for the backlog estimate: server/engine/backlog.py)."""

    outputs: tuple[RequestOutput, ...] = ()
    cycle: tuple[int, float] | None = None  # (forward rows, wall seconds) of the step before, start to start
    max_rows: int | None = None  # the row budget now (halved after out-of-memory errors)
