"""Admission at the front door: refuse at once, with an honest Retry-After, what the engine could not
serve in time, instead of admitting work that would end in 504. The service checks it against its
engine's backlog (server/engine/backlog.py); a Ray engine replica checks its own queue with it again.

A request is refused (429) when
  - the queue holds --max-queue requests (`queue_full`),
  - its API key already has --max-requests-per-key requests queued or in flight (`key_quota_exceeded`),
  - or it could not finish within HEADROOM of the time it has left (`overloaded`): the backlog (its
    row-steps, this request's included) drains in steps as wide as its requests side by side (up to the
    row budget; one request at a time under --policy none), each costing what the engine measured such a
    step to cost in wall time, the time between steps included (server/engine/step_cost.py,
    `Load.drain_seconds`); and the request needs at least its own steps.
Nothing is estimated before the engine has measured a few steps (step_cost.MIN_STEPS), and an idle engine
admits any request.
"""

from __future__ import annotations

import math

from .backlog import Load
from .request import EngineRequest, ErrorKind, RequestError

# The share of a request's remaining time the estimate may fill. Half: step times swing by tens of
# percent as other work takes the CPU, the answer still has to travel back, and a request that misses its
# deadline after admission wasted the rows it held. Under overload the backlog this admits (half the
# timeout) still keeps every step full, so the margin costs no throughput (bench/overload.py).
HEADROOM = 0.5


def seconds_to_finish(request: EngineRequest, load: Load) -> float | None:
    """Estimated seconds from now until `request` would finish if admitted now; None before any measurement."""
    if not load.measured:
        return None
    ahead = load.work + request.row_steps  # row-steps (a sample costs 2 rows only where it is guided)
    own_width = min(max(1, load.max_rows), request.mean_rows)
    return max(load.drain_seconds(ahead, request.mean_rows, 1), request.steps * load.step_seconds(own_width))


class Admission:
    def __init__(self, max_queue: int, max_per_key: int | None, deadline_aware: bool = True):
        self.max_queue, self.max_per_key, self.deadline_aware = max_queue, max_per_key, deadline_aware

    def check(self, request: EngineRequest, load: Load, owned: int, now: float) -> None:
        """Raise the refusal for `request`, or return if it may go in. owned: its key's requests in the
        engine; now: the wall clock, which its deadline is read on."""
        if load.waiting >= self.max_queue:
            raise RequestError(ErrorKind.QUEUE_FULL, f"{load.waiting} requests are already waiting; try again later",
                               retry_after=load.retry_after())
        if self.max_per_key is not None and request.owner is not None and owned >= self.max_per_key:
            raise RequestError(ErrorKind.KEY_QUOTA_EXCEEDED, f"this API key already has {owned} requests queued or "
                               f"running (the limit is {self.max_per_key}); wait for one to finish",
                               retry_after=load.retry_after())
        if self.deadline_aware and (load.waiting or load.work):
            # An idle engine takes any request: there is no backlog to protect, and its steps re-measure the
            # step time (an estimate left high by a slow period would otherwise refuse everything for good).
            seconds = seconds_to_finish(request, load)
            budget = (request.deadline - now) * HEADROOM
            if seconds is not None and seconds > budget:
                raise RequestError(ErrorKind.OVERLOADED, f"the server is busy: this request would take about "
                                   f"{seconds:.1f} s, and it is admitted only if that fits in {HEADROOM:.0%} of the "
                                   f"{request.deadline - now:.1f} s it may take (its deadline); try again later, or "
                                   "ask for fewer steps or images", retry_after=math.ceil(seconds - budget))
