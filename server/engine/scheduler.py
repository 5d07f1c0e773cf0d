"""The scheduler decides, and only decides: which samples join the batch at the next step and which
leave, within the row budget, by what policy, in what order across API keys, which requests are past
their deadline, and which want a preview. It holds no tensors and runs nothing (EngineCore.step does).

Policies:
  "continuous" (the default): waiting samples join round-robin across the waiting requests, in arrival
    order (one sample of each request per round; with API keys, one of each key's oldest request, the
    key served least recently first), while every future step they would run in stays within the row
    budget (`max_batch_rows`; a guided sample costs 2 rows at its guided steps, 1 elsewhere). A request
    for many images shares the rows with the requests behind it, a key with many requests shares them
    with the other keys, and nothing starves. Background requests (a dataset's) are a lower class: their
    samples join only while no interactive request waits, so they fill the rows interactive work leaves.
  "request": only when nothing is in flight, as many whole requests as fit; that batch runs until its
    last request finishes (request-level batching, for comparison).
  "none": one request at a time (no batching, for comparison).

Background samples (a dataset's) join while no interactive request waits, up to the row budget in
number, and run only at the steps where rows are left (`background_rows`, from the measured step cost):
alone, steps no longer than BACKGROUND_ALONE_STEPS steps of one guided image (a request arriving during
one waits at most that; for BACKGROUND_GRACE_SECONDS after interactive work, as small as beside it);
beside interactive samples, only as many rows as keep the step within
BACKGROUND_SLOWDOWN of the step without them. The others pause (keep their state, run no row) for that
step, so interactive latency stays near what it is on an idle server.

The row budget halves after an out-of-memory step and doubles back after REGROW_AFTER_STEPS clean steps.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from model.batch import Join

from .contract import StepPlan
from .request import EngineRequest, FinishReason, RequestStatus
from .slots import SlotTable

log = logging.getLogger(__name__)

PREVIEW_SECONDS = 0.25  # at most one preview per request this often
REGROW_AFTER_STEPS = 64  # clean steps after an out-of-memory halving before the row budget doubles back
BACKGROUND_SLOWDOWN = 1.2  # beside interactive samples, background rows may make a step this much slower
# Alone, background samples take steps no longer than this many steps of one guided image: an interactive
# request that arrives during one waits at most that long (on a CPU a step's time grows with its rows).
BACKGROUND_ALONE_STEPS = 6
# After interactive work, background steps stay as small as beside it for this long: interactive requests
# come in runs, and one that arrives during a full-size background step waits for that step.
BACKGROUND_GRACE_SECONDS = 0.5


class Scheduler:
    def __init__(self, policy: str, max_rows: int, slots: SlotTable):
        self.policy = policy
        self.budget = max_rows  # the configured row budget
        self.max_rows = max_rows  # the budget now
        self.slots = slots
        self.queue: deque[EngineRequest] = deque()  # requests with samples not yet admitted, in arrival order
        self.running: dict[str, EngineRequest] = {}  # requests with at least one admitted sample
        self.queue_changed = False
        self._cancels: dict[str, FinishReason] = {}
        self._leaves: list[int] = []  # slots to free in the next plan
        self.started: list[EngineRequest] = []  # requests whose first sample the last plan admitted
        self._previewing: dict[str, EngineRequest] = {}
        self._served: dict[str, int] = {}  # API key hash -> when it last had a sample admitted
        self._admissions = 0
        self._clean_steps = 0
        # The step cost (fixed, per_row seconds) the background's share is judged by; (0, 0) = not measured,
        # and then background samples run only when nothing interactive does.
        self.step_cost: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)
        self._interactive_until = float("-inf")  # background steps stay small until then (the grace)

    # ---- requests in and out ---------------------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        request.status = RequestStatus.QUEUED
        self.queue.append(request)
        self.queue_changed = True

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        """Drop the request at the next step (the client went away, or its front-end deadline passed)."""
        self._cancels[request_id] = reason

    def abandoned(self, now: float) -> list[tuple[EngineRequest, FinishReason]]:
        """The requests that were cancelled or passed their deadline (the core retires them)."""
        out = []
        for r in self.everything():
            reason = self._cancels.pop(r.id, None) or (FinishReason.TIMED_OUT if now > r.deadline else None)
            if reason is not None:
                out.append((r, reason))
        self._cancels.clear()  # cancels of requests that had already ended
        return out

    def retire(self, r: EngineRequest) -> None:
        """Take a request out: its slots leave the batch at the next plan."""
        self.running.pop(r.id, None)
        if r.admitted < r.num_images and r in self.queue:  # still queued, or admitted in part
            self.queue.remove(r)
            self.queue_changed = True
        self._previewing.pop(r.id, None)
        for slot in r.slots:
            self.slots.release(slot)
            self._leaves.append(slot)
        r.slots.clear()

    @property
    def leaving(self) -> bool:
        return bool(self._leaves)

    def take_leaves(self) -> tuple[int, ...]:
        leaves, self._leaves = tuple(self._leaves), []
        return leaves

    def everything(self) -> list[EngineRequest]:
        """Every request in the engine, once (a request admitted in part is both queued and running)."""
        return list({r.id: r for r in (*self.queue, *self.running.values())}.values())

    # ---- the next step ---------------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan | None:
        """The next step's plan, or None when nothing is in flight (leaves may still wait: take_leaves)."""
        self.started = []
        joins = self._admit(now)
        if not self.slots.owner:
            return None
        finish, rows = self.slots.advance()
        subset = None
        # Interactive samples in flight, even at a step their cache skips (0 rows): the step stays theirs.
        interactive = len(self.slots.owner) > len(self.slots.background)
        if interactive:
            self._interactive_until = now + BACKGROUND_GRACE_SECONDS
        if self.slots.background:
            run, done = self.slots.run_background(
                self.background_rows(rows, interactive or now < self._interactive_until) - rows, force=not interactive)
            finish = (*finish, *done)
            if len(run) < len(self.slots.background):  # some pause: step the others only
                subset = tuple(s for s in self.slots.owner if s not in self.slots.background or s in run)
        return StepPlan(joins=tuple(joins), leaves=self.take_leaves(), subset=subset, finish=finish,
                        previews=self._preview_slots(now))

    def background_rows(self, rows: int, interactive: bool) -> int:
        """The step's rows at most with background samples beside `rows` rows of interactive samples
        (`interactive`: whether any is in flight; a cached one may take no row at this step)."""
        fixed, per_row = self.step_cost()
        if not interactive:
            if per_row <= 0:
                return self.max_rows
            alone = (BACKGROUND_ALONE_STEPS * (fixed + 2 * per_row) - fixed) / per_row
            return max(1, min(self.max_rows, int(alone)))
        if per_row <= 0:
            return rows
        most = (BACKGROUND_SLOWDOWN * (fixed + per_row * rows) - fixed) / per_row
        return max(rows, min(self.max_rows, int(most)))

    def _admit(self, now: float) -> list[Join]:
        joins: list[Join] = []
        if self.policy == "continuous":
            while self.queue:
                for r in self._round():
                    if r.background:
                        if len(self.slots.background) >= self.max_rows:
                            return joins  # enough to fill the budget: the rest waits for one to finish
                    elif self.slots.owner and not self.slots.fits(r.timeline, self.max_rows):
                        return joins  # full at some future step: the rest waits for a later step
                    joins.append(self._admit_sample(r, now))
        elif not self.slots.owner:
            admitted = 0
            limit = 1 if self.policy == "none" else None
            while self.queue and (limit is None or admitted < limit):
                r = self.queue[0]
                if admitted and not self.slots.fits(r.timeline, self.max_rows, r.num_images):
                    break
                while r.admitted < r.num_images:
                    joins.append(self._admit_sample(r, now))
                admitted += 1
        return joins

    def _round(self) -> list[EngineRequest]:
        """One admission round: the requests that get one sample each. Without API keys that is every
        waiting request; with keys, one request per key (its oldest), the key served least recently
        first, so that a key flooding the queue gets no more of the batch than any other key."""
        keys: set = set()
        chosen = []
        interactive = any(not r.background for r in self.queue)
        for r in self.queue:
            if interactive and r.background:
                continue  # the lower class waits while an interactive request does
            key = r.owner if r.owner is not None else r.id
            if key not in keys:
                keys.add(key)
                chosen.append(r)
        if self._served:
            chosen.sort(key=lambda r: self._served.get(r.owner, -1))
        return chosen

    def _admit_sample(self, r: EngineRequest, now: float) -> Join:
        """Admit the request's next sample into a free slot; the request leaves the queue with its last one."""
        k = r.admitted
        slot = self.slots.take(r, k)
        r.slots.append(slot)
        r.admitted += 1
        r.last_join_tick = self.slots.tick + 1
        if r.owner is not None:
            self._served[r.owner] = self._admissions
        self._admissions += 1
        if k == 0:
            r.status, r.queue_position, r.admitted_at = RequestStatus.RUNNING, None, now
            self.running[r.id] = r
            self.started.append(r)
            if r.previews:
                self._previewing[r.id] = r
        if r.admitted == r.num_images:
            self.queue.remove(r)
            self.queue_changed = True
        return Join(slot, r.class_id, r.seeds[k], r.sampling)

    def positions(self) -> list[EngineRequest]:
        """The queued requests with their new positions, once after the queue changed; else nothing."""
        if not self.queue_changed:
            return []
        self.queue_changed = False
        waiting = [(position, r) for position, r in enumerate(self.queue, start=1) if r.admitted == 0]
        for position, r in waiting:
            r.queue_position = position
        return [r for _, r in waiting]

    # ---- previews --------------------------------------------------------------------------------------
    def _preview_slots(self, now: float) -> tuple[int, ...]:
        """Slots to render small after the coming step: each previewing request every steps // 10 of its
        steps (all its samples in flight), at most every PREVIEW_SECONDS, never at its last step."""
        slots: list[int] = []
        for r in self._previewing.values():
            step = self.slots.tick + 1 - r.last_join_tick  # its steps done after the coming step
            every = max(1, r.steps // 10)
            if (len(r.slots) == r.num_images and step % every == 0 and step < r.steps
                    and now - r.last_preview >= PREVIEW_SECONDS):
                r.last_preview = now
                slots += r.slots
        return tuple(slots)

    def previewed(self, previews: dict) -> list[EngineRequest]:
        """The previewing requests whose every sample was rendered in this step."""
        return [r for r in self._previewing.values() if r.slots and all(s in previews for s in r.slots)]

    # ---- the row budget --------------------------------------------------------------------------------
    def halve(self) -> None:
        self.max_rows = max(1, self.max_rows // 2)
        self._clean_steps = 0

    def clean_step(self) -> None:
        if self.max_rows < self.budget:
            self._clean_steps += 1
            if self._clean_steps >= REGROW_AFTER_STEPS:
                self.max_rows = min(self.budget, self.max_rows * 2)
                self._clean_steps = 0
                log.info("row budget grows back to %d after %d clean steps", self.max_rows, REGROW_AFTER_STEPS)
