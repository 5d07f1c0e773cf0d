"""The engine core, in-process with a fake runner and a fake clock, driven by `EngineCore.step()`:
admission, row budget, fairness, deadlines, cancellation, failures and retirement, read from the outputs
each step returns. Nothing here sleeps or touches a tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.samplers import Sampling
from model.samplers import plan as sampler_plan
from server.engine.backlog import Backlog
from server.engine.contract import DecodeFailed, StepPlan, StepResult
from server.engine.core import EngineCore
from server.engine.failures import DeviceLost
from server.engine.loop import EngineLoop
from server.engine.metrics import EngineMetrics
from server.engine.request import EngineRequest, ErrorKind, FinishReason, RequestError, RequestOutput
from server.engine.scheduler import REGROW_AFTER_STEPS


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Checks every plan against the contract and "denoises" by counting steps per slot.

    A finished sample's image is filled with its class id, so delivery order can be checked."""

    def __init__(self, clock: FakeClock, step_seconds: float = 0.01):
        self.clock, self.step_seconds = clock, step_seconds
        self.plans: list[StepPlan] = []
        self.slots: dict[int, list] = {}  # slot -> [join, steps done]
        self.raise_next: list[Exception] = []
        self.nonfinite: set[int] = set()  # classes whose samples come out NaN
        self.max_rows_seen = 0
        self.rows_per_step: list[int] = []  # the forward rows of each step run
        self.max_samples_seen = 0

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for slot in plan.leaves:
            del self.slots[slot]
        for j in plan.joins:
            assert j.slot not in self.slots, f"slot {j.slot} joined twice"
            self.slots[j.slot] = [j, 0]
        if self.raise_next and not isinstance(self.raise_next[0], DecodeFailed):
            raise self.raise_next.pop(0)
        if not plan.steps_nothing:
            stepped = list(self.slots) if plan.subset is None else list(plan.subset)
            self.rows_per_step.append(sum(self._rows(*self.slots[s]) for s in stepped))
            self.max_rows_seen = max(self.max_rows_seen, self.rows_per_step[-1])
            self.max_samples_seen = max(self.max_samples_seen, len(stepped))
            for s in stepped:
                self.slots[s][1] += 1
                assert self.slots[s][1] <= self.slots[s][0].steps, f"slot {s} stepped past its last iteration"
            self.clock.now += self.step_seconds
        if self.raise_next and plan.finish:  # a decode failure: after the step; the slots are freed
            for s in plan.finish:
                del self.slots[s]
            raise self.raise_next.pop(0)
        finite = []
        for s in plan.finish:
            join, done = self.slots.pop(s)
            assert done == join.steps, f"slot {s} finished after {done} of {join.steps} steps"
            finite.append(join.label not in self.nonfinite)
        images = [np.full((2, 2, 3), self_class, np.uint8) for self_class in
                  [self._class_of(plan, s) for s, ok in zip(plan.finish, finite, strict=True) if ok]]
        previews = {slot: np.full((2, 2, 3), self.slots[slot][0].label, np.uint8) for slot in plan.previews}
        return StepResult(finished=plan.finish, finite=tuple(finite),
                          pixels=np.stack(images) if images else None, previews=previews)

    @staticmethod
    def _rows(join, done: int) -> int:
        """Rows of a sample at its iteration `done`: 2 if guided there (u = t / 999 in its interval)."""
        lo, hi = join.guidance_interval
        t = sampler_plan(join.sampler, join.steps).timesteps[done]
        return 2 if join.cfg_scale != 1 and lo <= t / 999 <= hi else 1

    def _class_of(self, plan: StepPlan, slot: int) -> int:
        for p in reversed(self.plans):
            for j in p.joins:
                if j.slot == slot:
                    return j.label
        raise AssertionError(slot)


class Harness:
    """An engine core with a fake runner; requests are numbered 1, 2, ... and image k of request n has the
    seed 100 n + k, so that a join names its request."""

    def __init__(self, policy="continuous", max_batch_rows=8):
        self.clock = FakeClock()
        self.runner = FakeRunner(self.clock)
        self.metrics = EngineMetrics()
        self.core = EngineCore(self.runner, policy, max_batch_rows, self.metrics, clock=self.clock)
        self.requests: list[EngineRequest] = []
        self.outputs: list[RequestOutput] = []
        self.backlog = Backlog(max_batch_rows, one_at_a_time=policy == "none")  # fed as a transport feeds it

    def request(self, class_id=1, steps=3, images=1, cfg=1.0, timeout=60.0, sampler="ddim",
                interval=(0.0, 1.0), owner=None, previews=False) -> EngineRequest:
        n = len(self.requests) + 1
        r = EngineRequest(str(n), class_id, tuple(100 * n + k for k in range(images)),
                          Sampling(sampler, steps, cfg, interval), arrival=self.clock.now,
                          deadline=self.clock.now + timeout, owner=owner, previews=previews)
        self.requests.append(r)
        return r

    def submit(self, *requests: EngineRequest) -> None:
        for r in requests:
            self.backlog.add(r)
            self.core.add(r)

    def step(self):
        outputs = self.core.step()
        self.backlog.apply(outputs)
        self.outputs += outputs.outputs
        return outputs

    def run(self, max_steps: int = 1000) -> int:
        """Step until the engine has no work; returns how many steps ran the model."""
        before = len(self.runner.rows_per_step)
        for _ in range(max_steps):
            if not self.core.has_work:
                return len(self.runner.rows_per_step) - before
            self.step()
        raise AssertionError("the engine never went idle")

    def end(self, r: EngineRequest) -> RequestOutput | None:
        ends = [o for o in self.outputs if o.id == r.id and o.ended]
        assert len(ends) <= 1, f"request {r.id} ended {len(ends)} times"
        return ends[0] if ends else None

    def error(self, r: EngineRequest) -> RequestError | None:
        end = self.end(r)
        return end.error if end is not None else None

    def finished(self, reason: str) -> int:
        """Requests that ended for this reason (the front-end counts them the same way)."""
        ends = [o for o in self.outputs if o.ended]
        return sum(1 for o in ends if (o.error.reason.value if o.error is not None else "finished") == reason)

    def order(self) -> list[EngineRequest]:
        """The requests delivered with images, in the order they ended."""
        by_id = {r.id: r for r in self.requests}
        return [by_id[o.id] for o in self.outputs if o.ended and o.pixels is not None]

    def pixels(self, r: EngineRequest) -> np.ndarray:
        return self.end(r).pixels

    def joined(self, plan: int = 0) -> list[str]:
        """The requests whose samples joined in the n-th plan, in order."""
        return [str(j.seed // 100) for j in self.runner.plans[plan].joins]


def test_a_request_runs_its_steps_and_ends_with_its_pixels_in_sample_order():
    h = Harness()
    r = h.request(class_id=4, steps=5, images=3)
    h.submit(r)
    assert h.run() == 5
    assert h.order() == [r]
    assert h.pixels(r).shape == (3, 2, 2, 3) and (h.pixels(r) == 4).all()
    progress = [o.step for o in h.outputs if o.id == r.id and not o.ended]
    assert progress == [1, 2, 3, 4, 5]  # admitted at once: one output per step
    end = h.end(r)
    assert set(end.timings) == {"queue", "denoise", "decode"} and end.queue_position is None
    assert h.finished("finished") == 1 and h.runner.slots == {}


def test_round_robin_admission_lets_a_small_request_in_beside_a_large_one():
    h = Harness(max_batch_rows=4)
    big, small = h.request(class_id=1, images=8, steps=4), h.request(class_id=2, images=1, steps=4)
    h.submit(big, small)
    h.step()
    assert h.joined(0) == ["1", "2", "1", "1"]  # one sample of each request per round
    h.run()
    assert h.order() == [small, big]


def test_background_samples_pause_for_interactive_ones_and_take_what_they_leave():
    """A dataset's request (background) fills idle rows. An interactive request joins at once, whatever the
    background holds; beside it, background samples run only in the rows that keep the step within
    BACKGROUND_SLOWDOWN of its cost without them (none while the step cost is unmeasured) and pause
    otherwise, keeping their state; then they go on, each to its own last step."""
    h = Harness(max_batch_rows=4)
    dataset = h.request(class_id=1, images=8, steps=4)
    dataset.background = True
    h.submit(dataset)
    h.step()
    assert h.joined(0) == ["1"] * 4  # nothing else: every row
    late = h.request(class_id=2, images=2, steps=4)
    h.submit(late)
    h.step()
    assert h.joined(1) == ["2", "2"]  # at once: background samples never hold an interactive one back
    late_slots = {j.slot for j in h.runner.plans[1].joins}
    assert set(h.runner.plans[1].subset) == late_slots  # the dataset's four pause (no step cost measured yet)
    h.run()
    assert h.order() == [late, dataset] and h.runner.max_rows_seen <= 4
    assert dataset.id in {o.id for o in h.outputs if o.ended and o.pixels is not None}


def test_beside_interactive_samples_background_ones_get_the_rows_the_step_cost_allows():
    h = Harness(max_batch_rows=8)

    class Measured:  # the core's step-cost fit, fixed for the test: 50 ms a step + 10 ms a row
        estimate = (0.05, 0.01)

        def add(self, rows, seconds):
            pass

    h.core.cost = Measured()
    h.core.scheduler.step_cost = lambda: h.core.cost.estimate
    dataset = h.request(class_id=1, images=6, steps=3)
    dataset.background = True
    late = h.request(class_id=2, images=2, steps=3)
    h.submit(dataset)
    h.step()
    h.submit(late)
    h.step()
    # 2 interactive rows: 70 ms; within 1.2 x that (84 ms), 3 rows in all: one background sample runs
    assert len(h.runner.plans[1].subset) == 3
    h.run()
    assert h.order()[0] is late and len(h.order()) == 2


def test_admission_goes_round_robin_across_api_keys():
    h = Harness(max_batch_rows=4)
    flood = [h.request(class_id=1, images=2, steps=4, owner="key-a") for _ in range(4)]
    other = h.request(class_id=2, images=2, steps=4, owner="key-b")
    h.submit(*flood, other)
    h.step()
    owners = [h.requests[int(n) - 1].owner for n in h.joined(0)]
    assert owners == ["key-a", "key-b", "key-a", "key-b"]  # half the rows each, not 4 of key-a's requests
    h.run()
    assert h.order().index(other) <= 1


def test_the_key_served_least_recently_goes_first():
    """One row: one sample joins at a time. Key a's three requests came first, yet key b's waits for one
    of them only: the key that was served least recently is admitted first, not the oldest request."""
    h = Harness(max_batch_rows=1)
    a = [h.request(class_id=1, steps=2, owner="key-a") for _ in range(3)]
    b = h.request(class_id=2, steps=2, owner="key-b")
    h.submit(*a, b)
    h.run()
    assert h.order() == [a[0], b, a[1], a[2]]


def test_the_row_budget_is_never_exceeded():
    h = Harness(max_batch_rows=6)
    requests = [h.request(class_id=k % 10, steps=2 + k % 5, images=1 + k % 3, cfg=[1.0, 3.0][k % 2])
                for k in range(12)]
    h.submit(*requests)
    h.run()
    assert h.runner.max_rows_seen <= 6
    assert sorted(r.id for r in h.order()) == sorted(r.id for r in requests)


def test_an_oversized_request_runs_alone_when_nothing_else_is_in_flight():
    h = Harness(max_batch_rows=1)
    r = h.request(cfg=4.0)  # a guided sample costs 2 rows
    h.submit(r)
    h.run()
    assert h.order() == [r]


def test_deadlines_while_queued_and_while_running():
    h = Harness(max_batch_rows=1)
    running, queued = h.request(steps=50, timeout=0.2), h.request(steps=2, timeout=0.1)
    h.submit(running, queued)
    h.run()
    for r in (running, queued):
        assert h.error(r).kind == ErrorKind.DEADLINE_EXCEEDED
    assert "while it waited" in h.error(queued).message
    assert "during generation" in h.error(running).message
    assert h.finished("timed_out") == 2
    assert h.runner.slots == {}  # the running request's slot was freed


def test_cancellation_frees_the_slots_and_says_cancelled():
    h = Harness()
    r, other = h.request(steps=10, images=2), h.request(steps=10)
    h.submit(r, other)
    h.step()
    h.core.abort(r.id, FinishReason.CANCELLED)
    h.run()
    assert h.error(r).kind == ErrorKind.CANCELLED and h.finished("cancelled") == 1
    assert h.order() == [other]
    assert set(h.runner.plans[1].leaves) == {j.slot for j in h.runner.plans[0].joins if j.seed // 100 == 1}


def test_a_timed_out_cancel_from_the_front_end_is_a_timeout():
    h = Harness()
    r = h.request(steps=10)
    h.submit(r)
    h.step()
    h.core.abort(r.id, FinishReason.TIMED_OUT)
    h.run()
    assert h.error(r).kind == ErrorKind.DEADLINE_EXCEEDED and h.error(r).reason == FinishReason.TIMED_OUT


def test_a_cancel_of_a_request_that_has_ended_is_ignored():
    h = Harness()
    r = h.request(steps=2)
    h.submit(r)
    h.run()
    h.core.abort(r.id, FinishReason.CANCELLED)
    later = h.request(steps=2)
    h.submit(later)
    h.run()
    assert h.order() == [r, later] and h.finished("cancelled") == 0


def test_a_step_error_fails_that_batch_only():
    h = Harness(max_batch_rows=2)
    a, b, later = h.request(steps=3), h.request(steps=3), h.request(steps=3)
    h.submit(a, b, later)
    h.runner.raise_next = [RuntimeError("boom")]
    h.run()
    for r in (a, b):
        assert h.error(r).kind == ErrorKind.GENERATION_FAILED
    assert h.order() == [later] and h.finished("failed") == 2
    assert h.runner.slots == {}


def test_out_of_memory_halves_the_budget_retries_in_halves_and_grows_back():
    h = Harness(max_batch_rows=8)
    requests = [h.request(steps=3, class_id=k) for k in range(4)]
    h.submit(*requests)
    h.runner.raise_next = [torch.OutOfMemoryError("CUDA out of memory")]
    h.run()
    assert sorted(r.id for r in h.order()) == sorted(r.id for r in requests)  # all succeed
    subsets = [p.subset for p in h.runner.plans if p.subset]
    assert len(subsets) == 2 and sorted(subsets[0] + subsets[1]) == [0, 1, 2, 3]
    assert h.core.scheduler.max_rows == 4 and h.backlog.max_rows == 4  # the transport hears of it
    h.submit(h.request(steps=REGROW_AFTER_STEPS + 1))
    h.run()
    assert h.core.scheduler.max_rows == 8


def test_a_device_error_fails_everything_and_the_loop_refuses_new_work():
    h = Harness(max_batch_rows=1)
    running, queued = h.request(steps=3), h.request(steps=3)
    h.submit(running, queued)
    h.runner.raise_next = [DeviceLost("CUDA error: an illegal memory access was encountered")]
    h.run()
    for r in (running, queued):
        assert h.error(r).kind == ErrorKind.NOT_READY
    assert h.core.broken and "device error" in h.core.broken
    loop = EngineLoop(h.core, lambda outputs: None)
    with pytest.raises(RequestError) as e:
        loop.submit(h.request())
    assert e.value.kind == ErrorKind.NOT_READY and loop.problem() == h.core.broken


def test_non_finite_samples_fail_their_request_at_retirement():
    h = Harness()
    h.runner.nonfinite = {6}
    bad, good = h.request(class_id=6, images=2), h.request(class_id=2)
    h.submit(bad, good)
    h.run()
    assert "non-finite" in h.error(bad).message
    assert h.order() == [good]


def test_a_failed_decode_fails_only_the_finishing_requests():
    h = Harness()
    short, long = h.request(steps=2), h.request(steps=5)
    h.submit(short, long)
    h.step()
    h.runner.raise_next = [DecodeFailed("decoding failed: boom")]
    h.run()
    assert h.error(short).kind == ErrorKind.GENERATION_FAILED
    assert h.order() == [long]


def test_queue_positions_are_pushed_when_the_queue_moves():
    h = Harness(max_batch_rows=1)
    requests = [h.request(steps=2) for _ in range(3)]
    h.submit(*requests)
    h.step()
    positions = {o.id: o.queue_position for o in h.outputs if o.status == "queued"}
    assert positions == {"2": 1, "3": 2}  # the first was admitted in this step
    h.step()
    h.step()  # the first finished in step 2: the second joins in step 3
    assert [o.queue_position for o in h.outputs if o.id == "3" and o.status == "queued"] == [2, 1]
    h.run()
    assert h.order() == requests


@pytest.mark.parametrize("policy,expected_forwards", [("continuous", 6), ("request", 10), ("none", 14)])
def test_policies(policy, expected_forwards):
    h = Harness(policy=policy, max_batch_rows=8)
    h.submit(h.request(steps=4), h.request(steps=6))
    h.step()
    h.submit(h.request(steps=4))  # arrives after the first step
    assert h.run() + 1 == expected_forwards


def test_the_loop_thread_finishes_what_was_accepted_and_then_refuses():
    h = Harness()
    ended: list[RequestOutput] = []
    loop = EngineLoop(h.core, lambda outputs: ended.extend(o for o in outputs.outputs if o.ended))
    requests = [h.request(steps=3) for _ in range(3)]
    for r in requests:
        loop.submit(r)
    loop.start()
    loop.stop(timeout=30)
    assert [o.id for o in ended] == [r.id for r in requests] and all(o.pixels is not None for o in ended)
    with pytest.raises(RequestError):
        loop.submit(h.request())


# ddim 10 steps: t = 999, 888, ..., 111, 0; [0.5, 1] guides the first 5 (t >= 499.5), [0, 0.5] the last 5.
EARLY, LATE = (0.5, 1.0), (0.0, 0.5)


def test_narrow_intervals_admit_more_samples_and_keep_every_step_within_the_budget():
    def run(interval):
        h = Harness(max_batch_rows=4)
        requests = [h.request(class_id=k, steps=10, cfg=3.0, interval=interval) for k in range(5)]
        h.submit(*requests)
        steps = h.run()
        assert sorted(r.id for r in h.order()) == sorted(r.id for r in requests)
        assert h.runner.max_rows_seen <= 4
        return h.runner.max_samples_seen, steps

    assert run((0.0, 1.0)) == (2, 30)  # 2 rows each at every step: two at a time
    # guided early only: a sample joins as soon as its guided steps meet the others' unguided ones
    assert run(EARLY) == (3, 25)


def test_admission_looks_ahead_to_a_sample_s_guided_steps():
    h = Harness(max_batch_rows=3)
    h.submit(h.request(class_id=1, steps=10, cfg=3.0, interval=LATE))  # 1 row for 5 steps, then 2
    h.step()
    # 1 + 1 rows would fit at step 2, but its guided steps 7..11 would meet the first's (2 + 2 > 3): it
    # joins at step 6, where its unguided steps 6..10 meet the first's guided ones (2 + 1 = 3)
    h.submit(h.request(class_id=2, steps=10, cfg=3.0, interval=LATE))
    h.run()
    assert h.runner.max_rows_seen == 3
    assert [k + 1 for k, p in enumerate(h.runner.plans) if p.joins] == [1, 6]  # full guidance: [1, 11]


def test_mixed_intervals_never_exceed_the_budget_and_the_accounting_returns_to_zero():
    h = Harness(max_batch_rows=7)
    intervals = [(0.0, 1.0), EARLY, LATE, (0.3, 0.6), (0.45, 0.55)]
    requests = [h.request(class_id=k % 10, steps=3 + k % 9, images=1 + k % 3, cfg=[1.0, 2.0, 4.0][k % 3],
                          sampler=["ddim", "ddpm", "dpm-solver++"][k % 4 % 3], interval=intervals[k % 5])
                for k in range(15)]
    h.submit(*requests[:10])
    for _ in range(4):
        h.step()
    victim = next(r for r in requests if r.status == "running" and r.steps > 6)
    h.core.abort(victim.id, FinishReason.CANCELLED)  # frees its future rows
    h.submit(*requests[10:])
    h.run()
    assert h.runner.max_rows_seen <= 7
    # the rows of each step are the runner's (observed by dit_forward_rows)
    assert h.metrics.forward_rows._sum.get() == sum(h.runner.rows_per_step)
    assert h.core.slots.ahead == {} and h.core.slots.owner == {}
    assert len(h.order()) == 14
    load = h.backlog.load()
    assert (load.waiting, load.work, load.rows, load.requests) == (0, 0, 0.0, 0) and len(h.backlog) == 0


def test_a_request_admitted_in_part_ends_once_and_leaves_the_queue():
    """Two rows, a request for four images: two join, two wait. Its deadline passes: it ends once, its
    admitted samples leave the batch and its waiting ones the queue; the next request runs."""
    h = Harness(max_batch_rows=2)
    part = h.request(steps=20, images=4, timeout=0.05)
    h.submit(part)
    h.step()
    assert part.admitted == 2 and part in h.core.scheduler.queue and part.id in h.core.scheduler.running
    h.run()
    assert h.error(part).kind == ErrorKind.DEADLINE_EXCEEDED  # (end() asserts it ended once)
    assert not h.core.scheduler.queue and not h.core.scheduler.running and h.runner.slots == {}
    later = h.request(steps=2)
    h.submit(later)
    h.run()
    assert h.order() == [later]


def test_a_failure_outside_the_step_s_recovery_ends_every_request_and_breaks_the_engine():
    h = Harness()
    outputs: list[RequestOutput] = []
    calls = []

    def sink(step):  # a bug in what the outputs are handed to, once
        calls.append(step)
        if len(calls) == 1:
            raise RuntimeError("a bug in the sink")
        outputs.extend(step.outputs)

    loop = EngineLoop(h.core, sink)
    requests = [h.request(steps=50) for _ in range(2)]
    for r in requests:
        loop.submit(r)
    loop.start()
    loop.stop(timeout=30)
    ends = {o.id: o.error.kind for o in outputs if o.ended}
    assert ends == {r.id: ErrorKind.NOT_READY for r in requests} and "a bug in the sink" in loop.problem()
