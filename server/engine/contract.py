"""The step contract between the scheduler and the model runner: plain frozen dataclasses, no tensors.

Each step the scheduler plans one `StepPlan` (who joins, who leaves, which slots to step, which finish
and are read out, which want a preview) and the runner answers one `StepResult`. Slots are small
integers the scheduler allocates (server/engine/slots.py); the runner keeps each slot's tensors on the
device. A joining sample is the model's own `Join` (slot, class, seed, validated sampling settings).
Finishing follows from step counts, so the scheduler knows which slots finish without asking the
device; the only device sync is the runner's finite check of the finishing slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.batch import Join


@dataclass(frozen=True)
class StepPlan:
    joins: tuple[Join, ...] = ()
    leaves: tuple[int, ...] = ()  # slots freed before the step (cancelled, timed out, failed requests)
    subset: tuple[int, ...] | None = None  # step only these slots (out-of-memory fallback); None = all
    finish: tuple[int, ...] = ()  # slots whose last iteration is this step: check, decode and free them
    previews: tuple[int, ...] = ()  # slots whose predicted x0 to render small after the step

    @property
    def steps_nothing(self) -> bool:
        return self.subset is not None and not self.subset


@dataclass(frozen=True)
class StepResult:
    finished: tuple[int, ...] = ()  # the plan's `finish` slots, in order
    finite: tuple[bool, ...] = ()  # per finished slot: free of NaN/inf
    pixels: np.ndarray | None = None  # (number of finite finished slots, H, W, 3) uint8, in `finished` order
    previews: dict[int, np.ndarray] = field(default_factory=dict)  # slot -> (h, w, 3) uint8
    decode_seconds: float = 0.0
    # Forward rows the step actually ran; None: as planned (the rows timeline). A cache that decided from the
    # data could only run fewer than the timeline holds (the timeline is then an upper bound).
    rows: int | None = None


class DecodeFailed(RuntimeError):
    """The step succeeded but decoding the finishing slots failed (only their requests fail)."""
