"""`EngineCore.step()`: schedule -> execute -> update, returning the step's outputs.

The core owns the scheduler (decisions), the slot table (who is where, the rows timeline) and the model
runner (tensors). Whoever drives it (the thread loop in server/engine/loop.py, which the engine process,
`--engine thread` and a Ray replica all use) adds and aborts requests between steps and forwards what
each step returns; nothing polls. Per request, a step's outputs say its progress (steps done, queue
position), a preview when one is due, or its end: pixels and timings, or an error with its finish reason.

Failures: an exception in a step fails the requests in that batch only; an out-of-memory error halves
the row budget and retries the step in two halves (the budget doubles back after a run of clean steps);
a device error (the context is unusable) fails everything and marks the engine broken, so that the
orchestrator restarts it; a failed decode fails the requests that were finishing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from .contract import DecodeFailed, StepPlan, StepResult
from .failures import is_fatal, is_out_of_memory
from .metrics import EngineMetrics
from .request import (
    EngineOutputs,
    EngineRequest,
    ErrorKind,
    FinishReason,
    RequestError,
    RequestOutput,
    RequestStatus,
)
from .scheduler import Scheduler
from .slots import SlotTable
from .step_cost import StepCost

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, runner, policy: str, max_rows: int, metrics: EngineMetrics, *, replica: str | None = None,
                 clock: Callable[[], float] = time.time):
        """runner: has `execute(StepPlan) -> StepResult`. clock: the wall clock deadlines are read on."""
        self.runner, self.metrics, self.replica, self.clock = runner, metrics, replica, clock
        self.slots = SlotTable()
        self.scheduler = Scheduler(policy, max_rows, self.slots)
        self.cost = StepCost()  # each step's (rows, seconds): what background samples may add to a step
        self.scheduler.step_cost = lambda: self.cost.estimate
        self.broken: str | None = None  # a device error: nothing more can run
        self._cycle: tuple[float, int] | None = None  # (start, rows) of the step before, while busy

    # ---- between steps (on the thread that calls step) ---------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        self.scheduler.add(request)

    def abort(self, request_id: str, reason: FinishReason) -> None:
        self.scheduler.cancel(request_id, reason)

    @property
    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.queue or s.running or s.leaving)

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self) -> EngineOutputs:
        now = self.clock()
        out = [self._end(r, self._abandoned_error(r, reason)) for r, reason in self.scheduler.abandoned(now)]
        plan = self.scheduler.schedule(now)
        out += [self._output(r) for r in self.scheduler.positions()]
        self.metrics.queue_depth.set(len(self.scheduler.queue))
        if plan is None:
            leaves = self.scheduler.take_leaves()
            if leaves:  # free the slots of dropped requests even when nothing else runs
                self.runner.execute(StepPlan(leaves=leaves, subset=()))
            self.metrics.active_samples.set(0)
            self._cycle = None  # idle: the wait until the next request is no step's cost
            return EngineOutputs(tuple(out), max_rows=self.scheduler.max_rows)
        for r in self.scheduler.started:
            self.metrics.queue_wait.observe(max(0.0, now - r.arrival))
        t0, rows = self.clock(), self.slots.rows(self.slots.tick)
        cycle = None if self._cycle is None else (self._cycle[1], t0 - self._cycle[0])  # start to start
        self._cycle = (t0, rows)
        result = self._execute(plan, out)
        if result is not None:
            if result.rows is not None:  # the rows it ran (the timeline is exact, or an upper bound)
                rows = result.rows
                self._cycle = (t0, rows)
            seconds = self.clock() - t0
            self.cost.add(rows, seconds)
            out += self._update(result, rows, seconds)
        self.slots.past()
        self.metrics.active_samples.set(len(self.slots))
        return EngineOutputs(tuple(out), cycle, self.scheduler.max_rows)

    def _execute(self, plan: StepPlan, out: list[RequestOutput]) -> StepResult | None:
        """Run the plan; on failure recover as the module's docstring says. None when the step failed."""
        try:
            return self.runner.execute(plan)
        except DecodeFailed as e:
            log.exception("decode failed")
            out += self._fail_finishing(plan.finish, str(e))
            return StepResult()
        except Exception as e:
            if is_fatal(e):
                out += self._break(e)
                return None
            if is_out_of_memory(e):
                try:
                    return self._retry_in_halves(plan)
                except DecodeFailed as again:
                    out += self._fail_finishing(plan.finish, str(again))
                    return StepResult()
                except Exception as again:
                    e = again
            log.error("a denoising step failed; failing the %d requests in this batch", len(self.scheduler.running),
                      exc_info=e)
            error = RequestError(ErrorKind.GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}")
            out += [self._end(r, error) for r in list(self.scheduler.running.values())]
            return None

    def _retry_in_halves(self, plan: StepPlan) -> StepResult:
        self.scheduler.halve()
        slots = sorted(self.slots.owner) if plan.subset is None else list(plan.subset)  # not the paused ones
        log.warning("out of memory with %d samples in one step: row budget halved to %d; retrying the step "
                    "in two halves", len(slots), self.scheduler.max_rows)
        half = max(1, len(slots) // 2)
        first = self.runner.execute(StepPlan(subset=tuple(slots[:half])))
        second = self.runner.execute(StepPlan(subset=tuple(slots[half:]), finish=plan.finish))
        if first.rows is None or second.rows is None:
            return second
        return dataclasses.replace(second, rows=first.rows + second.rows)

    def _break(self, e: Exception) -> list[RequestOutput]:
        self.broken = f"device error: {type(e).__name__}: {e}"
        log.critical("%s; failing every request and reporting not ready (restart the server)", self.broken)
        error = RequestError(ErrorKind.NOT_READY, self.broken)
        return [self._end(r, error) for r in self.scheduler.everything()]

    def fail_everything(self, reason: str) -> EngineOutputs:
        """After a failure outside any step's recovery: the engine is broken, every request it holds ends."""
        self.broken = reason
        error = RequestError(ErrorKind.NOT_READY, reason)
        ended = []
        for r in self.scheduler.everything():
            try:
                ended.append(self._end(r, error))
            except Exception:  # its bookkeeping is what failed: it still ends
                ended.append(RequestOutput.failed(r.id, error, r.step, self.replica))
        return EngineOutputs(tuple(ended))

    def _fail_finishing(self, slots: tuple[int, ...], message: str) -> list[RequestOutput]:
        """The runner already freed these slots; fail their requests (and free the rest of their slots)."""
        requests = {self.slots.owner[s][0] for s in slots if s in self.slots.owner}
        for slot in slots:
            if slot in self.slots.owner:
                self.slots.owner[slot][0].slots.remove(slot)  # so that retiring does not free it again
                self.slots.release(slot)
        return [self._end(r, RequestError(ErrorKind.GENERATION_FAILED, message)) for r in requests]

    # ---- update ------------------------------------------------------------------------------------------
    def _update(self, result: StepResult, rows: int, seconds: float) -> list[RequestOutput]:
        m = self.metrics
        m.step_duration.observe(seconds)
        m.batch_size.observe(len(self.slots))
        m.forward_rows.observe(rows)
        m.forward_rows_total.inc(rows)
        m.denoise_steps.inc(len(self.slots))
        self.scheduler.clean_step()
        tick = self.slots.tick
        out = []
        previewed = {r.id: r for r in self.scheduler.previewed(result.previews)} if result.previews else {}
        for r in self.scheduler.running.values():  # progress: one int per request
            if r.background:
                continue  # its samples pause and run at their own pace; its end is what is awaited
            step = min(r.steps, tick - r.last_join_tick + 1) if r.admitted == r.num_images else 0
            if step != r.step or r.id in previewed:
                r.step = step
                preview = np.stack([result.previews[s] for s in r.slots]) if r.id in previewed else None
                out.append(self._output(r, preview=preview))
        if result.finished:
            out += self._collect(result)
        return out

    def _collect(self, result: StepResult) -> list[RequestOutput]:
        """Finished samples leave the batch (the runner freed their slots); complete requests end."""
        if result.decode_seconds:
            self.metrics.decode_duration.observe(result.decode_seconds)
        row, failed = 0, []
        for slot, ok in zip(result.finished, result.finite, strict=True):
            r, k = self.slots.release(slot)
            r.slots.remove(slot)
            if ok:
                r.pixels[k] = result.pixels[row]
                row += 1
            elif r not in failed:
                failed.append(r)
        out = []
        for r in failed:
            log.error("request produced NaN/inf values (class %d, seeds %s); failing it", r.class_id, r.seeds)
            out.append(self._end(r, RequestError(ErrorKind.GENERATION_FAILED, "the model produced non-finite values "
                                                 "for this request; try another seed or a lower guidance scale")))
        now = self.clock()
        for r in [r for r in self.scheduler.running.values() if len(r.pixels) == r.num_images]:
            pixels = np.stack([r.pixels[k] for k in range(r.num_images)])
            timings = {"queue": r.admitted_at - r.arrival, "denoise": now - result.decode_seconds - r.admitted_at,
                       "decode": result.decode_seconds}
            out.append(self._end(r, pixels=pixels, timings=timings))
        return out

    # ---- outputs -----------------------------------------------------------------------------------------
    def _end(self, r: EngineRequest, error: RequestError | None = None, pixels: np.ndarray | None = None,
             timings: dict[str, float] | None = None) -> RequestOutput:
        """Take the request out of the engine and say how it ended."""
        self.scheduler.retire(r)
        r.status, r.pixels = RequestStatus.FINISHED, {}
        if error is not None and timings is None and r.admitted_at is not None:
            timings = {"queue": r.admitted_at - r.arrival}
        return RequestOutput(r.id, RequestStatus.FINISHED, r.step, None, pixels=pixels, error=error,
                             timings=timings, replica=self.replica)

    def _output(self, r: EngineRequest, preview: np.ndarray | None = None) -> RequestOutput:
        return RequestOutput(r.id, r.status, r.step, r.queue_position, preview=preview, replica=self.replica)

    @staticmethod
    def _abandoned_error(r: EngineRequest, reason: FinishReason) -> RequestError:
        if reason == FinishReason.CANCELLED:
            return RequestError(ErrorKind.CANCELLED, "the client cancelled the request")
        if r.admitted_at is None:
            return RequestError(ErrorKind.DEADLINE_EXCEEDED, "the request's deadline passed while it waited")
        return RequestError(ErrorKind.DEADLINE_EXCEEDED, "the request's deadline passed during generation")
