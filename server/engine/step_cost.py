"""`StepCost`: what one engine step costs in wall time at a given width, fitted from the steps it ran.

A step's cost is modelled as `fixed + per_row * rows`: on a CPU it grows with the rows, on a GPU below
saturation it is nearly flat. Each sample is a step's cycle: from its start to the next step's start
while the engine had work, so the time between steps (admitting, retiring, talking to the front-end) is
part of the cost. Admission (server/engine/admission.py, via `Load`) drains the backlog in steps as wide as its
rows side by side (up to the row budget), at the fitted cost of that width.

The fit is robust (Theil-Sen: the median of the slopes between pairs of steps, then the median
intercept) over the last WINDOW steps, so that it follows the machine as it speeds up or slows down (a
busy front-end on the same cores) within half a window, and a few slow steps do not move it. Such steps
come in bursts: the first steps of a fresh process, or the cycle in which forty requests arrive at once,
took 5-30x the usual time on the CPU. A least-squares fit read them as a large fixed cost (narrow slow
steps, wide fast ones: a negative slope, clamped flat), estimated wide steps at 2-3x their cost for dozens
of steps, and refused a burst an idle server could serve (CI, 2026-11-28).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque

WINDOW = 32  # steps the fit looks at
MIN_STEPS = 8  # before this many, nothing is estimated (admission admits, Retry-After is 1 s)


class StepCost:
    def __init__(self) -> None:
        self._steps: deque[tuple[int, float]] = deque(maxlen=WINDOW)  # (rows, seconds)
        self._lock = threading.Lock()  # the engine thread adds, the front-end's reader fits
        self._fit: tuple[float, float] | None = None  # cached until the next step

    def add(self, rows: int, seconds: float) -> None:
        """On the engine thread, once a step: an append (the fit runs when someone reads it)."""
        with self._lock:
            self._steps.append((rows, seconds))
            self._fit = None

    @property
    def estimate(self) -> tuple[float, float]:
        """(fixed, per_row) in seconds; (0, 0) before MIN_STEPS steps were measured."""
        with self._lock:
            if self._fit is None:
                self._fit = _theil_sen(list(self._steps)) if len(self._steps) >= MIN_STEPS else (0.0, 0.0)
            return self._fit

    def seconds(self, rows: int) -> float:
        """Estimated wall seconds of one step of `rows` forward rows (0 before it was measured)."""
        fixed, per_row = self.estimate
        return fixed + per_row * rows


def _theil_sen(steps: list[tuple[int, float]]) -> tuple[float, float]:
    """The slope is kept between flat (0) and proportional (the median cost per row), so that noisy steps
    cannot extrapolate a wider step's cost beyond either physical extreme. One width seen: proportional
    (exact at that width)."""
    proportional = statistics.median(t / max(1, r) for r, t in steps)
    slopes = [(t2 - t1) / (r2 - r1) for i, (r1, t1) in enumerate(steps) for r2, t2 in steps[i + 1:] if r2 != r1]
    if not slopes:
        return 0.0, proportional
    per_row = min(proportional, max(0.0, statistics.median(slopes)))
    return max(0.0, statistics.median(t - per_row * r for r, t in steps)), per_row
