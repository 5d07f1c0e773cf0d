"""The backlog: the work submitted to an engine and not yet computed, kept as running sums, and `Load`,
what admission reads from it (server/engine/admission.py).

One `Backlog` sits wherever outputs arrive: the front-end's handle on its engine (process or thread),
a Ray engine replica (its own check), and the fleet's front-end. A request is added when it is
submitted (so a burst cannot overcommit between two steps), moved by its outputs (queued -> running,
steps done) and removed at its end: one add, one update, one remove, each O(1).

A request's remaining work is counted from its slowest sample's step: num_images x the rows of its
steps still ahead (exact for a request admitted whole; a request admitted in part counts all of its
steps until its last sample joins, which errs on the safe side).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

from .request import EngineOutputs, EngineRequest, RequestStatus
from .step_cost import StepCost


@dataclass(frozen=True)
class Load:
    """The engine's backlog, for admission decisions."""

    waiting: int  # requests not yet admitted
    work: int  # row-steps queued or in flight, not yet computed
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


@lru_cache(maxsize=4096)
def _work_ahead(timeline: tuple[int, ...]) -> tuple[int, ...]:
    """Row-steps still ahead of one sample after `step` steps, for step = 0..len(timeline)."""
    ahead = [0] * (len(timeline) + 1)
    for i in range(len(timeline) - 1, -1, -1):
        ahead[i] = ahead[i + 1] + timeline[i]
    return tuple(ahead)


def _share(request: EngineRequest, step: int, queued: bool) -> tuple[int, int, float, int]:
    """(waiting, work, rows, requests) that one request adds to the load: none for a background one (a
    dataset's), which takes only the rows interactive requests leave and never holds them back."""
    if request.background:
        return 0, 0, 0.0, 0
    n, timeline = request.num_images, request.timeline
    work = n * _work_ahead(timeline)[min(step, len(timeline))]
    if queued:
        return 1, work, request.mean_rows, 1
    running = step < len(timeline)  # else only being decoded or encoded
    return 0, work, n * timeline[step] if running else 0.0, int(running)


class Backlog:
    def __init__(self, max_rows: int, one_at_a_time: bool):
        self.max_rows, self.one_at_a_time = max_rows, one_at_a_time
        self.cost = StepCost()  # fitted from the steps the engine reports (EngineOutputs.cycle)
        self._entries: dict[str, tuple[EngineRequest, tuple[int, int, float, int]]] = {}
        self._sums = [0, 0, 0.0, 0]  # waiting, work, rows, requests
        self._lock = threading.Lock()  # submits (event loop) and outputs (the transport's thread)

    def add(self, request: EngineRequest) -> int:
        """A request submitted; returns how many requests wait now, itself included (its queue position)."""
        with self._lock:
            self._set(request, _share(request, 0, True))
            return self._sums[0]

    def apply(self, outputs: EngineOutputs) -> None:
        """One step's outputs: progress moves each request's share, an end removes it."""
        if outputs.cycle is not None:
            self.cost.add(*outputs.cycle)
        if outputs.max_rows is not None:
            self.max_rows = outputs.max_rows
        with self._lock:
            for out in outputs.outputs:
                entry = self._entries.get(out.id)
                if entry is None:
                    continue
                if out.ended:
                    self._drop(out.id)
                else:
                    self._set(entry[0], _share(entry[0], out.step, out.status == RequestStatus.QUEUED))

    def remove(self, request_id: str) -> EngineRequest | None:
        with self._lock:
            return self._drop(request_id)

    def requests(self) -> list[EngineRequest]:
        with self._lock:
            return [request for request, _ in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, share: int = 1, estimate: tuple[float, float] | None = None, max_rows: int | None = None) -> Load:
        """The load, spread over `share` engines (a fleet), at the step cost fitted here or `estimate`."""
        with self._lock:
            waiting, work, rows, requests = self._sums
            if not self._entries:
                rows = 0.0  # no float residue
        fixed, per_row = estimate if estimate is not None else self.cost.estimate
        return Load(waiting=-(-waiting // share), work=-(-work // share), rows=rows / share,
                    requests=-(-requests // share), one_at_a_time=self.one_at_a_time, step_fixed=fixed,
                    step_per_row=per_row, max_rows=self.max_rows if max_rows is None else max_rows)

    def _set(self, request: EngineRequest, share: tuple[int, int, float, int]) -> None:
        old = self._entries.get(request.id)
        self._entries[request.id] = (request, share)
        for i, value in enumerate(share):
            self._sums[i] += value - (old[1][i] if old is not None else 0)

    def _drop(self, request_id: str) -> EngineRequest | None:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        for i, value in enumerate(entry[1]):
            self._sums[i] -= value
        return entry[0]
