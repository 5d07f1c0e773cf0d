"""`StepCost`: what one engine step costs in wall time at a given width, fitted from the steps it ran.

A step's cost is modelled as `fixed + per_row * rows`: on a CPU it grows with the rows, on a GPU below
saturation it is nearly flat. The fit is least squares over the recent steps (older ones forgotten
exponentially), so it follows the machine as it speeds up or slows down (a busy front-end on the same
cores). Each sample is a step's cycle: from its start to the next step's start while the engine had
work, so the time between steps (admitting, retiring, talking to the front-end) is part of the cost.
Admission (server/admission.py, via `Load`) drains the backlog in steps as wide as its rows side by side
(up to the row budget), at the fitted cost of that width.
"""

from __future__ import annotations

DECAY = 0.95  # weight of the older steps at each new one: the fit spans the last ~20 steps


class StepCost:
    def __init__(self) -> None:
        self._w = self._r = self._rr = self._t = self._rt = 0.0  # decayed sums of 1, r, r^2, t, r * t
        # (fixed, per_row): the fit, both 0 before any step. One tuple, replaced whole by the engine
        # thread, so a reader on another thread never sees half an update.
        self.estimate = (0.0, 0.0)

    def add(self, rows: int, seconds: float) -> None:
        d = DECAY
        self._w, self._r, self._rr = d * self._w + 1, d * self._r + rows, d * self._rr + rows * rows
        self._t, self._rt = d * self._t + seconds, d * self._rt + rows * seconds
        self.estimate = self._fit()

    def seconds(self, rows: int) -> float:
        """Estimated wall seconds of one step of `rows` forward rows (0 before any step was measured)."""
        fixed, per_row = self.estimate
        return fixed + per_row * rows

    def _fit(self) -> tuple[float, float]:
        """The slope is kept between flat (0) and proportional (the mean cost over the mean width), so that
        noisy steps cannot extrapolate a wider step's cost beyond either physical extreme."""
        mean_r, mean_t = self._r / self._w, self._t / self._w
        if mean_r <= 0:
            return mean_t, 0.0
        var_r = self._rr / self._w - mean_r * mean_r
        proportional = mean_t / mean_r
        if var_r < 1.0:  # (nearly) one width only: proportional (exact at that width)
            per_row = proportional
        else:
            per_row = min(proportional, max(0.0, (self._rt / self._w - mean_r * mean_t) / var_r))
        return mean_t - per_row * mean_r, per_row
