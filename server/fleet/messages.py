"""What the front-end deployment and the engine replicas send each other through Ray (pickled).

    front-end -> engine replica:  Request (one call per request; its answer is a stream)
    engine replica -> front-end:  Update (steps done, queue position), engine.messages.Preview,
                                  Finished (the pixels), engine.messages.Failed  -- the stream's items
                                  Report (every second: load, metrics)           -- a call of its own

Clocks: replicas may run on other hosts, whose time.monotonic() means nothing here, so times cross as
ages ("seconds before this message was made"), never as clock readings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..contracts import GenerationSpec
from ..engine.messages import Load

REPORT_SECONDS = 1.0  # how often an engine replica reports its load and metrics
STALE_SECONDS = 5 * REPORT_SECONDS  # a replica not heard from for this long counts as gone


def to_age(reading: float | None, now: float) -> float | None:
    """A reading of this process's monotonic clock as seconds before `now` (None stays None)."""
    return None if reading is None else now - reading


def to_clock(age: float | None, now: float | None = None) -> float | None:
    """Seconds before now as a reading of this process's monotonic clock."""
    return None if age is None else (time.monotonic() if now is None else now) - age


@dataclass(frozen=True)
class Request:
    spec: GenerationSpec
    seconds_left: float  # until its deadline
    owner: str | None
    age: float  # seconds since it arrived at the front-end


@dataclass(frozen=True)
class Update:
    replica: str
    progress: int
    queue_position: int | None
    admitted_age: float | None


@dataclass(frozen=True)
class Finished:
    pixels: np.ndarray  # (N, H, W, 3) uint8
    admitted_age: float | None
    denoised_age: float | None
    decoded_age: float | None


@dataclass(frozen=True)
class Report:
    """An engine replica's state, sent every second: liveness, admission and /metrics all read it."""

    replica: str
    load: Load
    metrics: bytes  # the replica's Prometheus exposition
