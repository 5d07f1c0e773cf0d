"""Slot bookkeeping and the rows timeline: which sample holds which slot, when each finishes, and how
many forward rows every future step holds. No tensors (the runner keeps each slot's on the device).

Steps are numbered by `tick` (steps run so far). A sample that joins before step T with n steps runs
in steps T .. T + n - 1 and finishes in the last; its rows at each of those steps (2 where guided, 1
elsewhere: its timeline) are added to the timeline when it joins and the rest refunded if it leaves
early, so that admission can check every future step against the row budget.

Background samples (a dataset's) are not in the timeline: they run only at the steps where the scheduler
gives them rows that interactive samples leave, so each keeps its own progress (`background`).
"""

from __future__ import annotations

from .request import EngineRequest


class SlotTable:
    def __init__(self) -> None:
        self.tick = 0  # steps run so far
        self.owner: dict[int, tuple[EngineRequest, int]] = {}  # slot -> (request, sample index)
        self._finish_at: dict[int, set[int]] = {}  # step -> slots whose last iteration it is
        self._slot_finish: dict[int, int] = {}  # slot -> its finishing step
        self._free: list[int] = []
        self._next = 0
        self.ahead: dict[int, int] = {}  # step -> forward rows of the admitted samples in it
        self.background: dict[int, int] = {}  # a background sample's slot -> its steps done, in admission order

    def __len__(self) -> int:
        return len(self.owner)

    def rows(self, tick: int) -> int:
        return self.ahead.get(tick, 0)

    def fits(self, timeline: tuple[int, ...], budget: int, samples: int = 1) -> bool:
        """Whether `samples` samples with this timeline, joining before the next step, keep every future
        step within `budget` rows."""
        start, ahead = self.tick + 1, self.ahead
        return all(ahead.get(start + i, 0) + samples * rows <= budget for i, rows in enumerate(timeline))

    def take(self, request: EngineRequest, sample: int) -> int:
        """A free slot for the request's sample, which first runs in the next step (a background sample:
        at the first step that gives it rows)."""
        slot = self._free.pop() if self._free else self._new()
        if request.background:
            self.owner[slot] = (request, sample)
            self.background[slot] = 0
            return slot
        timeline = request.timeline
        finish = self.tick + len(timeline)
        self.owner[slot] = (request, sample)
        self._finish_at.setdefault(finish, set()).add(slot)
        self._slot_finish[slot] = finish
        for i, rows in enumerate(timeline, start=self.tick + 1):
            if rows:  # a cached step adds no entry: `ahead` holds only steps with rows in them
                self.ahead[i] = self.ahead.get(i, 0) + rows
        return slot

    def release(self, slot: int) -> tuple[EngineRequest, int]:
        """Free the slot; the steps its sample will not take give their rows back."""
        request, sample = self.owner.pop(slot)
        self.background.pop(slot, None)
        finish = self._slot_finish.pop(slot, None)
        if finish is not None:
            self._finish_at[finish].discard(slot)
            timeline = request.timeline
            start = finish - len(timeline) + 1  # the step it first ran in
            for tick in range(self.tick + 1, finish + 1):
                rows = timeline[tick - start]
                if rows:
                    left = self.ahead[tick] - rows
                    if left:
                        self.ahead[tick] = left
                    else:
                        del self.ahead[tick]
        self._free.append(slot)
        return request, sample

    def advance(self) -> tuple[tuple[int, ...], int]:
        """Start the next step: (the slots whose last iteration it is, its forward rows)."""
        self.tick += 1
        finish = tuple(sorted(self._finish_at.pop(self.tick, ())))
        for slot in finish:
            del self._slot_finish[slot]
        return finish, self.ahead.get(self.tick, 0)

    def run_background(self, rows: int, force: bool) -> tuple[list[int], list[int]]:
        """Which background samples run in the current step within `rows` forward rows, oldest first (at
        least one if `force`): (those that run, those of them that finish). Their progress moves on."""
        run, finish = [], []
        for slot, done in self.background.items():
            timeline = self.owner[slot][0].timeline
            # A step its cache skips takes no forward row but is not free (the forecast, the final layer, the
            # update): counted as one here, so that cached background samples do not crowd a step.
            need = timeline[done] or 1
            if need <= rows or (force and not run):
                run.append(slot)
                rows -= need
                self.background[slot] = done + 1
                if done + 1 == len(timeline):
                    finish.append(slot)
        return run, finish

    def past(self) -> None:
        """The current step is over (run or failed): its rows leave the timeline."""
        self.ahead.pop(self.tick, None)

    def _new(self) -> int:
        self._next += 1
        return self._next - 1
