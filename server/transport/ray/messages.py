"""What an engine replica reports to the front-end deployment through Ray, besides each request's stream
of RequestOutputs (server/engine/request.py, the same outputs the engine process sends through its pipe).

Clocks: a request's arrival and deadline are wall-clock readings, which replicas on other hosts read on
their own (synchronised) clocks; what a replica measures travels as durations (RequestOutput.timings).
"""

from __future__ import annotations

import dataclasses
import json
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

    def to_json(self) -> bytes:
        """For the job store that relays it between front-ends (JSON: nothing in it runs when read)."""
        return json.dumps({"replica": self.replica, "load": dataclasses.asdict(self.load),
                           "metrics": self.metrics.decode(), "owners": [[k, n] for k, n in self.owners.items()]}
                          ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Report:
        d = json.loads(data)
        return cls(d["replica"], Load(**d["load"]), d["metrics"].encode(), {k: n for k, n in d["owners"]})
