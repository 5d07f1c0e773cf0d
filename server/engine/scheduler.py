"""The scheduler: which samples join and leave the batch at each step, and by what policy. No tensors.

One engine iteration (`run_once`, on the engine thread):
  1. Take the requests the HTTP side submitted from the inbox (submitting never waits for this thread).
  2. End the requests that were cancelled or passed their deadline; their slots leave the batch.
  3. Admit, by policy:
     "continuous" (the default): waiting samples round-robin across the waiting requests, in arrival
       order (one sample of each request per round; with API keys, of each key's oldest request), while
       they fit in the free row budget (`max_batch_rows`; a guided sample costs 2 rows, an unguided one
       1). A request for many images shares the rows with the requests behind it, a key with many
       requests shares them with the other keys, and nothing starves.
     "request": only when nothing is in flight, as many whole requests as fit; that batch runs until
       its last request finishes (request-level batching, for comparison).
     "none": one request at a time (no batching, for comparison).
  4. Hand the runner one StepPlan: joins, leaves, and the slots whose last iteration this is (known
     from step counts: a sample admitted before step T with n steps finishes at step T + n - 1).
  5. Update from the StepResult: progress, finished samples' pixels; a request whose samples have
     all finished is delivered (the front-end encodes it), one with NaN/inf values fails.

Rows: a sample costs 2 forward rows on the steps where it is guided (cfg_scale != 1 and the step inside
its guidance interval) and 1 elsewhere (model/denoise.py `rows_per_iteration`). The scheduler keeps the
rows of every future step (a small timeline, per step), and admits a sample only if every step it will
run in stays within the budget; so narrow intervals fit more samples and no step exceeds the budget.

Failures: an exception in a step fails the requests in that batch only; an out-of-memory error halves
the row budget and retries the step in two halves (the budget doubles back after a run of clean steps);
a device error (the context is unusable) fails everything and reports the engine broken, so that the
orchestrator restarts it. The queue holds at most `max_queue` requests; beyond that `submit` raises
QueueFull (HTTP 429).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from model.samplers import Sampling

from ..contracts import (
    GenerationFailed,
    InvalidRequest,
    Job,
    NotReady,
    QueueFull,
    SchedulerError,
)
from ..metrics import EngineMetrics
from .contract import DecodeFailed, SampleJoin, StepPlan, StepResult
from .failures import is_fatal, is_out_of_memory
from .messages import Load
from .step_cost import StepCost

log = logging.getLogger(__name__)

PREVIEW_SECONDS = 0.25  # at most one preview per request this often
REGROW_AFTER_STEPS = 64  # clean steps after an out-of-memory halving before the row budget doubles back


@dataclass(eq=False)
class _Request:
    """The scheduler's bookkeeping for one job: per request, never per step per sample."""

    id: int
    job: Job
    admitted: int = 0  # samples admitted so far
    slots: list[int] = field(default_factory=list)  # slots of its admitted, unfinished samples
    last_join_tick: int = 0  # the step its most recently admitted sample first ran in
    last_preview: float = float("-inf")  # when its last preview was asked for
    pixels: dict[int, np.ndarray] = field(default_factory=dict)  # sample index -> (H, W, 3) uint8

    @property
    def spec(self):
        return self.job.spec

    @property
    def timeline(self) -> tuple[int, ...]:
        """Forward rows one of its samples occupies at each of its steps."""
        return self.spec.timeline

    @property
    def sample_work(self) -> int:
        """One of its samples' row-steps (its forward rows summed over its steps)."""
        return sum(self.timeline)


class Scheduler:
    def __init__(self, runner, settings, metrics: EngineMetrics, *,
                 deliver: Callable[[Job, np.ndarray], None],
                 on_fatal: Callable[[str], None] = lambda reason: None,
                 on_preview: Callable[[Job, int, np.ndarray], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """runner: has `execute(StepPlan) -> StepResult` and `num_classes`. deliver(job, pixels) is called
        on the engine thread with a finished request's (N, H, W, 3) uint8 images; it must not block."""
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self.policy = settings.policy
        self.max_rows = settings.max_batch_rows
        self.deliver = deliver
        self.on_fatal = on_fatal
        self.on_preview = on_preview  # (job, step, (N, h, w, 3) uint8) for requests that asked for previews
        self.clock = clock
        # HTTP side -> engine thread: an inbox, and counters behind a lock held only for a few additions.
        self._inbox: deque[Job] = deque()
        self._wake = threading.Event()
        self._counts = threading.Lock()
        self._waiting = 0  # requests submitted and not yet fully admitted (inbox + queue)
        self._waiting_work = 0  # the sample-steps x rows of their samples not yet admitted
        self._waiting_rows = 0.0  # and those samples' mean forward rows, side by side
        self._ids = itertools.count(1)
        # Engine thread only.
        self._queue: deque[_Request] = deque()  # requests with samples not yet admitted, in arrival order
        self._running: dict[int, _Request] = {}  # requests with at least one admitted sample
        self._owner: dict[int, tuple[_Request, int]] = {}  # slot -> (request, sample index)
        self._finish_at: dict[int, set[int]] = {}  # step number -> slots whose last iteration it is
        self._slot_finish: dict[int, int] = {}  # slot -> its finishing step number
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._leaves: list[int] = []  # slots to free in the next plan
        # Forward rows of the admitted samples at each future step: step number -> rows. A sample costs 2
        # rows only on the steps where it is guided (its guidance interval), so admission looks ahead.
        self._ahead: dict[int, int] = {}
        self._inflight_work = 0  # row-steps the admitted samples still need
        self._cost = StepCost()  # a step's wall time by width, fitted from the steps run
        self._cycle: tuple[float, int] | None = None  # (start, rows) of the step before, while busy
        self._tick = 0  # steps run so far
        self._clean_steps = 0
        self._queue_changed = False
        self._previewing: dict[int, _Request] = {}  # running requests that asked for previews
        self._served: dict[str, int] = {}  # API key hash -> when it last had a sample admitted
        self._admissions = 0
        self._stopping = False  # admit nothing new, finish what was accepted
        self._broken: str | None = None  # a device error: nothing more can run
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- called from the HTTP side (never waits for the engine thread) ----------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping or self._broken:
            raise NotReady(self._broken or "the server is shutting down and takes no new work")
        self._check(job)
        with self._counts:
            if self._waiting >= self.settings.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting; try again later",
                                retry_after=self.load().retry_after())
            self._waiting += 1
            self._waiting_work += job.spec.row_steps
            self._waiting_rows += job.spec.mean_rows
        job.queue_position = self._waiting
        self._inbox.append(job)
        self._wake.set()

    def _check(self, job: Job) -> None:
        """A safety net behind the HTTP validation: a bad spec is refused, never admitted into a batch."""
        spec = job.spec
        if not 0 <= spec.class_id < self.runner.num_classes:
            raise InvalidRequest(f"class_id {spec.class_id} is outside 0..{self.runner.num_classes - 1}")
        try:
            Sampling(spec.sampler, spec.steps, spec.cfg_scale, spec.guidance_interval)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e

    def load(self) -> Load:
        """The backlog, for admission at the front door (server/admission.py); read from any thread."""
        fixed, per_row = self._cost.estimate
        running = self._ahead.get(self._tick + 1, 0)  # the next step's rows (a racy read is only an estimate)
        return Load(waiting=self._waiting, work=self._waiting_work + self._inflight_work,
                    rows=self._waiting_rows + running, requests=self._waiting + len(self._running),
                    one_at_a_time=self.policy == "none", step_fixed=fixed, step_per_row=per_row,
                    max_rows=self.max_rows)

    def problem(self) -> str | None:
        """Why this engine cannot serve (a device error, its thread gone), or None: a health check."""
        if self._broken:
            return self._broken
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine thread ended"
        return None

    def begin_stop(self) -> None:
        """Refuse new requests at once (SIGTERM); the engine keeps finishing what it has."""
        self._stopping = True
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop admitting new requests, finish the queued and in-flight ones, then end the engine thread."""
        self.begin_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._broken:
            if self.run_once():
                continue
            if self._stopping and not self._inbox:
                return
            self._wake.wait()

    def run_once(self) -> bool:
        """One iteration: inbox, drop, admit, step, update. False when there was nothing to do."""
        self._wake.clear()  # before draining: a submit after the drain sets it again
        while self._inbox:
            job = self._inbox.popleft()
            self._queue.append(_Request(next(self._ids), job))
            self._queue_changed = True
        now = self.clock()
        self._drop_abandoned(now)
        joins = self._admit(now)
        if self._queue_changed:
            self._update_queue_positions()
        if not self._owner:
            self._inflight_work = 0  # nothing in flight: drop any drift from failed steps
            if self._leaves:  # free the slots of dropped requests even when nothing else runs
                self.runner.execute(StepPlan(leaves=self._take_leaves(), subset=()))
            self.metrics.active_samples.set(0)
            self._cycle = None  # idle: the wait until the next request is no step's cost
            return False
        self._tick += 1
        finish = tuple(sorted(self._finish_at.pop(self._tick, ())))
        for slot in finish:
            del self._slot_finish[slot]
        plan = StepPlan(joins=joins, leaves=self._take_leaves(), finish=finish, previews=self._preview_slots(now))
        t0, rows = self.clock(), self._ahead.get(self._tick, 0)  # this step's forward rows
        if self._cycle is not None:  # the step before, from its start to this one's
            self._cost.add(self._cycle[1], t0 - self._cycle[0])
        self._cycle = (t0, rows)
        result = self._execute(plan)
        if result is not None:
            self._after_step(self.clock() - t0, rows, result)
        self._ahead.pop(self._tick, None)  # this step is past (failed or not)
        self.metrics.active_samples.set(len(self._owner))
        return True

    def _take_leaves(self) -> tuple[int, ...]:
        leaves, self._leaves = tuple(self._leaves), []
        return leaves

    # ---- admission ---------------------------------------------------------------------------------
    def _admit(self, now: float) -> list[SampleJoin]:
        joins: list[SampleJoin] = []
        if self.policy == "continuous":
            while self._queue:
                for r in self._round():
                    if self._owner and not self._fits(r.timeline):
                        return joins  # full at some future step: the rest waits for a later step
                    joins.append(self._admit_sample(r, now))
        elif not self._owner:
            admitted = 0
            limit = 1 if self.policy == "none" else None
            while self._queue and (limit is None or admitted < limit):
                r = self._queue[0]
                if admitted and not self._fits(r.timeline, r.spec.num_images):
                    break
                while r.admitted < r.spec.num_images:
                    joins.append(self._admit_sample(r, now))
                admitted += 1
        return joins

    def _fits(self, timeline: tuple[int, ...], samples: int = 1) -> bool:
        """Whether `samples` samples with this rows timeline, joining before the next step, keep every
        future step within the row budget (nothing in flight admits anything: an oversized request
        then runs alone)."""
        start, ahead = self._tick + 1, self._ahead
        return all(ahead.get(start + i, 0) + samples * rows <= self.max_rows for i, rows in enumerate(timeline))

    def _round(self) -> list[_Request]:
        """One admission round: the requests that get one sample each. Without API keys that is every
        waiting request; with keys, one request per key (its oldest), so that a key flooding the queue
        gets no more of the batch than any other key."""
        keys: set = set()
        chosen = []
        for r in self._queue:
            key = r.job.owner if r.job.owner is not None else r.id
            if key not in keys:
                keys.add(key)
                chosen.append(r)
        if self._served:  # API keys: the key served least recently goes first
            chosen.sort(key=lambda r: self._served.get(r.job.owner, -1))
        return chosen

    def _admit_sample(self, r: _Request, now: float) -> SampleJoin:
        """Admit the request's next sample into a free slot; the request leaves the queue with its last one."""
        spec, k = r.spec, r.admitted
        slot = self._free_slots.pop() if self._free_slots else self._take_new_slot()
        finish = self._tick + spec.steps  # this sample first runs in step _tick + 1
        self._owner[slot] = (r, k)
        self._finish_at.setdefault(finish, set()).add(slot)
        self._slot_finish[slot] = finish
        for i, rows in enumerate(r.timeline):
            self._ahead[self._tick + 1 + i] = self._ahead.get(self._tick + 1 + i, 0) + rows
        work = r.sample_work
        self._inflight_work += work
        with self._counts:  # the sample's share of the request moves from waiting to in flight
            self._waiting_work -= work
            self._waiting_rows -= work / spec.steps
        r.slots.append(slot)
        r.admitted += 1
        r.last_join_tick = self._tick + 1
        if r.job.owner is not None:
            self._served[r.job.owner] = self._admissions
        self._admissions += 1
        if k == 0:
            if spec.previews and self.on_preview is not None:
                self._previewing[r.id] = r
            self._running[r.id] = r
            r.job.timings.admitted = now
            r.job.queue_position = None
            self.metrics.queue_wait.observe(max(0.0, now - r.job.timings.arrival))
        if r.admitted == spec.num_images:
            self._leave_queue(r)
        return SampleJoin(slot, r.id, k, spec.class_id, spec.seeds[k], spec.sampler, spec.steps, spec.cfg_scale,
                          spec.guidance_interval)

    def _take_new_slot(self) -> int:
        self._next_slot += 1
        return self._next_slot - 1

    def _leave_queue(self, r: _Request) -> None:
        self._queue.remove(r)
        self._queue_changed = True
        # samples never admitted (cancelled or timed out while queued)
        left = (r.spec.num_images - r.admitted) * r.sample_work
        with self._counts:
            self._waiting -= 1
            self._waiting_work -= left
            self._waiting_rows -= left / r.spec.steps
            if not self._waiting:
                self._waiting_rows = 0.0  # no float residue

    def _update_queue_positions(self) -> None:
        for position, r in enumerate(self._queue, start=1):
            r.job.queue_position = position
        self.metrics.queue_depth.set(len(self._queue))
        self._queue_changed = False

    # ---- ending requests ---------------------------------------------------------------------------
    def _drop_abandoned(self, now: float) -> None:
        for r in [r for r in (*self._queue, *self._running.values()) if r.job.cancelled or now > r.job.deadline]:
            self._end(r, r.job.ended_error())

    def _end(self, r: _Request, error: SchedulerError | None = None, pixels: np.ndarray | None = None) -> None:
        """Take the request out of the engine: free its slots, resolve it, count its finish reason."""
        if r in self._queue:
            self._leave_queue(r)
        self._running.pop(r.id, None)
        self._previewing.pop(r.id, None)
        for slot in r.slots:
            self._release(slot)
            self._leaves.append(slot)
        r.slots.clear()
        if error is None:
            self.deliver(r.job, pixels)
        else:
            r.job.fail(error)

    def _release(self, slot: int) -> None:
        r, _ = self._owner.pop(slot)
        finish = self._slot_finish.pop(slot, None)
        if finish is not None:
            self._finish_at[finish].discard(slot)
            timeline = r.timeline
            start = finish - len(timeline) + 1  # the step it first ran in
            for tick in range(self._tick + 1, finish + 1):  # the steps it will not take
                self._ahead[tick] -= timeline[tick - start]
                self._inflight_work -= timeline[tick - start]
        self._free_slots.append(slot)

    # ---- stepping ----------------------------------------------------------------------------------
    def _execute(self, plan: StepPlan) -> StepResult | None:
        """Run the plan; on failure recover as the module's docstring says. None when the step failed."""
        try:
            return self.runner.execute(plan)
        except DecodeFailed as e:
            log.exception("decode failed")
            self._fail_finishing(plan.finish, GenerationFailed(str(e)))
            return StepResult()
        except Exception as e:
            return self._recover(plan, e)

    def _recover(self, plan: StepPlan, e: Exception) -> StepResult | None:
        if is_fatal(e):
            reason = f"device error: {type(e).__name__}: {e}"
            log.critical("%s; failing every request and reporting not ready (restart the server)", reason)
            self._broken = reason
            for r in [*self._queue, *self._running.values()]:
                self._end(r, NotReady(reason))
            self.on_fatal(reason)
            return None
        if is_out_of_memory(e):
            self.max_rows = max(1, self.max_rows // 2)
            self._clean_steps = 0
            slots = sorted(self._owner)
            log.warning("out of memory with %d samples in one step: row budget halved to %d; retrying the step "
                        "in two halves", len(slots), self.max_rows)
            half = max(1, len(slots) // 2)
            try:
                self.runner.execute(StepPlan(subset=tuple(slots[:half])))
                return self.runner.execute(StepPlan(subset=tuple(slots[half:]), finish=plan.finish))
            except DecodeFailed as again:
                self._fail_finishing(plan.finish, GenerationFailed(str(again)))
                return StepResult()
            except Exception as again:
                e = again
        log.error("a denoising step failed; failing the %d requests in this batch", len(self._running),
                  exc_info=e)
        for r in list(self._running.values()):
            self._end(r, GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
        return None

    def _fail_finishing(self, slots: tuple[int, ...], error: SchedulerError) -> None:
        """The runner already freed these slots; fail their requests (and free the rest of their slots)."""
        requests = {self._owner[s][0] for s in slots if s in self._owner}
        for slot in slots:
            if slot in self._owner:
                self._owner[slot][0].slots.remove(slot)  # so that _end does not ask the runner to free it again
                self._release(slot)
        for r in requests:
            self._end(r, error)

    def _after_step(self, seconds: float, rows: int, result: StepResult) -> None:
        self._inflight_work -= rows
        m = self.metrics
        m.step_duration.observe(seconds)
        m.batch_size.observe(len(self._owner))
        m.forward_rows.observe(rows)
        m.denoise_steps.inc(len(self._owner))
        if self.max_rows < self.settings.max_batch_rows:
            self._clean_steps += 1
            if self._clean_steps >= REGROW_AFTER_STEPS:
                self.max_rows = min(self.settings.max_batch_rows, self.max_rows * 2)
                self._clean_steps = 0
                log.info("row budget grows back to %d after %d clean steps", self.max_rows, REGROW_AFTER_STEPS)
        for r in self._running.values():  # progress for streaming clients: one int per request
            complete = r.admitted == r.spec.num_images
            r.job.progress = min(r.spec.steps, self._tick - r.last_join_tick + 1) if complete else 0
        if result.previews:
            self._send_previews(result.previews)
        if result.finished:
            self._collect(result)

    def _preview_slots(self, now: float) -> tuple[int, ...]:
        """Slots to render small after the coming step: each previewing request every steps // 10 of its
        steps (all its samples in flight), at most every PREVIEW_SECONDS, never at its last step."""
        slots: list[int] = []
        for r in self._previewing.values():
            step = self._tick + 1 - r.last_join_tick  # its steps done after the coming step (tick already counts it)
            every = max(1, r.spec.steps // 10)
            if (len(r.slots) == r.spec.num_images and step % every == 0 and step < r.spec.steps
                    and now - r.last_preview >= PREVIEW_SECONDS):
                r.last_preview = now
                slots += r.slots
        return tuple(slots)

    def _send_previews(self, previews: dict[int, np.ndarray]) -> None:
        for r in self._previewing.values():
            if r.slots and all(slot in previews for slot in r.slots):
                step = min(r.spec.steps, self._tick - r.last_join_tick + 1)
                self.on_preview(r.job, step, np.stack([previews[slot] for slot in r.slots]))

    def _collect(self, result: StepResult) -> None:
        """Finished samples leave the batch (the runner freed their slots); complete requests are delivered."""
        if result.decode_seconds:
            self.metrics.decode_duration.observe(result.decode_seconds)
        row = 0
        failed: list[_Request] = []
        for slot, ok in zip(result.finished, result.finite, strict=True):
            r, k = self._owner[slot]
            r.slots.remove(slot)
            self._release(slot)
            if ok:
                r.pixels[k] = result.pixels[row]
                row += 1
            elif r not in failed:
                failed.append(r)
        for r in failed:
            log.error("request produced NaN/inf values (class %d, seeds %s); failing it", r.spec.class_id,
                      r.spec.seeds)
            self._end(r, GenerationFailed("the model produced non-finite values for this request; "
                                          "try another seed or a lower guidance scale"))
        now = self.clock()
        for r in list(self._running.values()):
            if len(r.pixels) == r.spec.num_images:
                r.job.timings.denoised = now - result.decode_seconds
                r.job.timings.decoded = now
                self._end(r, pixels=np.stack([r.pixels[k] for k in range(r.spec.num_images)]))
