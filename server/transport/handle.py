"""What every transport shares: the events it reports to the service, and the backlog of what it
submitted, moved by the outputs it forwards (server/engine/backlog.py).

A transport (engine process, engine thread, Ray fleet) takes submit / cancel / stop and forwards every
RequestOutput to `EngineEvents.on_output` as it arrives: nothing is polled.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..engine.backlog import Backlog, Load
from ..engine.request import EngineOutputs, EngineRequest, RequestError, RequestOutput
from ..settings import Settings
from .messages import EngineInfo

log = logging.getLogger(__name__)


class EngineEvents(Protocol):
    """What the engine tells the service, from the transport's threads; none may block."""

    def on_status(self, text: str) -> None: ...
    def on_started(self, info: EngineInfo) -> None: ...
    def on_start_failed(self, reason: str) -> None: ...
    def on_fatal(self, reason: str) -> None: ...  # the device is unusable; the engine still answers
    def on_died(self, reason: str) -> None: ...  # the engine process is gone
    def on_capacity(self, serving: bool, status: str) -> None: ...  # a fleet's replicas all gone, or one back
    def on_output(self, output: RequestOutput) -> None: ...


class EngineHandle:
    def __init__(self, settings: Settings, events: EngineEvents):
        self.settings, self.events = settings, events
        self.backlog = Backlog(settings.max_batch_rows, one_at_a_time=settings.policy == "none")

    def frontend_exposition(self, own: bytes) -> bytes:
        """The front-end's series for /metrics: its own (a fleet's front-ends add each other's)."""
        return own

    def owned(self, owner: str | None) -> int:
        """Requests of this API key in the engine as far as other front-ends sent them (a fleet's, from its
        replicas' reports); a front-end counts its own exactly."""
        return 0

    def load(self) -> Load:
        return self.backlog.load()

    def _submitted(self, request: EngineRequest) -> None:
        """Count the request in the backlog at once; until the engine says, its place is the last."""
        request.queue_position = self.backlog.add(request)

    def _started(self, info: EngineInfo) -> None:
        """The engine is up: the step costs it measured start the backlog's fit, then the service hears."""
        for rows, seconds in info.step_costs:
            self.backlog.cost.add(rows, seconds)
        self.events.on_started(info)

    def _forward(self, outputs: EngineOutputs) -> None:
        self.backlog.apply(outputs)
        for output in outputs.outputs:
            try:
                self.events.on_output(output)
            except Exception:  # one bad output must not keep the step's others from their requests
                log.exception("could not hand over the output of request %s", output.id)

    def _end(self, request_id: str, error: RequestError, replica: str | None = None) -> None:
        """End a request on this side (its engine died, its call failed), unless it has ended already."""
        request = self.backlog.remove(request_id)
        if request is not None:
            self.events.on_output(RequestOutput.failed(request_id, error, request.step, replica))

    def _end_all(self, error: RequestError) -> int:
        requests = self.backlog.requests()
        for request in requests:
            self._end(request.id, error)
        return len(requests)
