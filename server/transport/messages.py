"""The engine process's pipe (pickled messages), and the model facts every transport reports.

    front-end -> engine:  an EngineRequest (submit), Cancel, ArmFault, Stop
    engine -> front-end:  lists of: EngineOutputs (a step's outputs), Status (loading...), Started (model
                          facts), StartFailed, Fatal (the device is unusable), MetricsSnapshot

Requests and outputs are the engine's own types (server/engine/request.py); the Ray transport sends the
same ones through deployment handles. Futures and events never cross.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ..engine.request import FinishReason


@dataclass(frozen=True)
class EngineInfo:
    """What the front-end needs to know about the loaded model (plain data)."""

    info: object  # model.ModelInfo: name, space, image_size, class names, defaults
    num_classes: int
    device: str
    dtype: str
    replica: str  # names this engine in the X-Replica header: host:pid, or the Ray Serve replica
    step_costs: tuple[tuple[int, float], ...] = ()  # (rows, seconds) of steps measured at start-up

    @classmethod
    def of(cls, runner, replica: str | None = None) -> EngineInfo:
        return cls(runner.info, runner.num_classes, str(runner.device), str(runner.dtype).removeprefix("torch."),
                   replica or f"{socket.gethostname()}:{os.getpid()}", tuple(getattr(runner, "step_costs", ())))


@dataclass(frozen=True)
class Cancel:
    id: str
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
class MetricsSnapshot:
    text: bytes


@dataclass(frozen=True)
class Fatal:
    reason: str
