"""What an engine replica reports to the front-end deployment through Ray, besides each request's stream
of RequestOutputs (server/engine/request.py, the same outputs the engine process sends through its pipe).

Clocks: a request's arrival and deadline are wall-clock readings, which replicas on other hosts read on
their own (synchronised) clocks; what a replica measures travels as durations (RequestOutput.timings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.backlog import Load

REPORT_SECONDS = 1.0  # how often an engine replica reports its load and metrics
STALE_SECONDS = 5 * REPORT_SECONDS  # a replica not heard from for this long counts as gone


@dataclass(frozen=True)
class Report:
    """An engine replica's state, sent every second: liveness, admission and /metrics all read it."""

    replica: str
    load: Load
    metrics: bytes  # the replica's Prometheus exposition
    owners: dict[str | None, int] = field(default_factory=dict)  # its requests per API key hash (quotas)
