"""The scheduler, in-process with a fake runner and a fake clock: admission, row budget, deadlines,
cancellation, failures, fairness and retirement. Nothing here sleeps or touches a tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.samplers import plan as sampler_plan
from server.contracts import (
    Cancelled,
    DeadlineExceeded,
    FinishReason,
    GenerationFailed,
    GenerationSpec,
    InvalidRequest,
    Job,
    NotReady,
    OutputSpec,
    QueueFull,
)
from server.engine.contract import DecodeFailed, StepPlan, StepResult
from server.engine.failures import DeviceLost
from server.engine.scheduler import REGROW_AFTER_STEPS, Scheduler
from server.metrics import EngineMetrics
from server.settings import Settings


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Checks every plan against the contract and "denoises" by counting steps per slot.

    A finished sample's image is filled with its class id, so delivery order can be checked."""

    num_classes = 10

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
            finite.append(join.class_id not in self.nonfinite)
        images = [np.full((2, 2, 3), self_class, np.uint8) for self_class in
                  [self._class_of(plan, s) for s, ok in zip(plan.finish, finite, strict=True) if ok]]
        previews = {slot: np.full((2, 2, 3), self.slots[slot][0].class_id, np.uint8) for slot in plan.previews}
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
                    return j.class_id
        raise AssertionError(slot)


class Harness:
    def __init__(self, **settings):
        self.clock = FakeClock()
        self.runner = FakeRunner(self.clock)
        self.metrics = EngineMetrics()
        self.jobs: list[Job] = []
        self.rejected = 0
        self.settings = Settings(**{"max_batch_rows": 8, "max_queue": 16, **settings})
        self.delivered: list[tuple[Job, np.ndarray]] = []
        self.fatal: list[str] = []
        self.scheduler = Scheduler(self.runner, self.settings, self.metrics, clock=self.clock,
                                   deliver=lambda job, px: self.delivered.append((job, px)),
                                   on_fatal=self.fatal.append)

    def job(self, class_id=1, steps=3, images=1, cfg=1.0, timeout=60.0, sampler="ddim",
            interval=(0.0, 1.0), owner=None) -> Job:
        spec = GenerationSpec(class_id, cfg, steps, sampler, tuple(range(images)), interval)
        job = Job(spec, OutputSpec(), deadline=self.clock.now + timeout, owner=owner)
        job.timings.arrival = self.clock.now
        return job

    def submit(self, *jobs: Job) -> None:
        for job in jobs:
            try:
                self.scheduler.submit(job)
            except Exception:
                self.rejected += 1
                raise
            self.jobs.append(job)

    def run(self, max_iterations: int = 1000) -> int:
        """Run iterations until idle; returns how many stepped."""
        for n in range(max_iterations):
            if not self.scheduler.run_once():
                return n
        raise AssertionError("the scheduler never went idle")

    def finished(self, reason: str) -> int:
        """Requests that ended for this reason (the front-end counts them the same way)."""
        if reason == "rejected":
            return self.rejected
        ended = [j.future.exception() for j in self.jobs if j.future.done()]
        ended += [None] * len(self.delivered)
        return sum(1 for e in ended if (e.reason.value if e is not None else "finished") == reason)

    def order(self) -> list[Job]:
        return [job for job, _ in self.delivered]


def test_a_request_runs_its_steps_and_is_delivered_in_sample_order():
    h = Harness()
    job = h.job(class_id=4, steps=5, images=3)
    h.submit(job)
    assert h.run() == 5
    assert h.order() == [job]
    pixels = h.delivered[0][1]
    assert pixels.shape == (3, 2, 2, 3) and (pixels == 4).all()
    assert job.progress == 5 and job.queue_position is None
    assert h.finished("finished") == 1 and h.runner.slots == {}


def test_round_robin_admission_lets_a_small_request_in_beside_a_large_one():
    h = Harness(max_batch_rows=4)
    big, small = h.job(class_id=1, images=8, steps=4), h.job(class_id=2, images=1, steps=4)
    h.submit(big, small)
    h.scheduler.run_once()
    first = h.runner.plans[0].joins
    assert [j.request_id for j in first] == [1, 2, 1, 1]  # one sample of each request per round
    h.run()
    assert h.order() == [small, big]


def test_admission_goes_round_robin_across_api_keys():
    h = Harness(max_batch_rows=4)
    flood = [h.job(class_id=1, images=2, steps=4, owner="key-a") for _ in range(4)]
    other = h.job(class_id=2, images=2, steps=4, owner="key-b")
    h.submit(*flood, other)
    h.scheduler.run_once()
    owners = [h.jobs[j.request_id - 1].owner for j in h.runner.plans[0].joins]
    assert owners == ["key-a", "key-b", "key-a", "key-b"]  # half the rows each, not 4 of key-a's requests
    h.run()
    assert h.order().index(other) <= 1


def test_the_row_budget_is_never_exceeded():
    h = Harness(max_batch_rows=6)
    jobs = [h.job(class_id=k % 10, steps=2 + k % 5, images=1 + k % 3, cfg=[1.0, 3.0][k % 2]) for k in range(12)]
    h.submit(*jobs)
    h.run()
    assert h.runner.max_rows_seen <= 6
    assert sorted(map(id, h.order())) == sorted(map(id, jobs))


def test_an_oversized_request_runs_alone_when_nothing_else_is_in_flight():
    h = Harness(max_batch_rows=1)
    job = h.job(cfg=4.0)  # a guided sample costs 2 rows
    h.submit(job)
    h.run()
    assert h.order() == [job]


def test_deadlines_while_queued_and_while_running():
    h = Harness(max_batch_rows=1)
    running, queued = h.job(steps=50, timeout=0.2), h.job(steps=2, timeout=0.1)
    h.submit(running, queued)
    h.run()
    for job in (running, queued):
        with pytest.raises(DeadlineExceeded):
            job.future.result(0)
    assert "while it waited" in str(queued.future.exception())
    assert "during generation" in str(running.future.exception())
    assert running.status == "timed_out" and h.finished("timed_out") == 2
    assert h.runner.slots == {}  # the running request's slot was freed


def test_cancellation_frees_the_slots_and_says_cancelled():
    h = Harness()
    job, other = h.job(steps=10, images=2), h.job(steps=10)
    h.submit(job, other)
    h.scheduler.run_once()
    job.cancel()
    h.run()
    with pytest.raises(Cancelled) as e:
        job.future.result(0)
    assert e.value.status == 409 and e.value.code == "cancelled"
    assert job.status == "cancelled" and h.finished("cancelled") == 1
    assert h.order() == [other]
    assert set(h.runner.plans[1].leaves) == {j.slot for j in h.runner.plans[0].joins if j.request_id == 1}


def test_a_timed_out_cancel_from_the_front_end_is_a_timeout():
    h = Harness()
    job = h.job(steps=10)
    h.submit(job)
    h.scheduler.run_once()
    job.cancel(FinishReason.TIMED_OUT)
    h.run()
    assert isinstance(job.future.exception(), DeadlineExceeded) and job.status == "timed_out"


def test_a_step_error_fails_that_batch_only():
    h = Harness(max_batch_rows=2)
    a, b, later = h.job(steps=3), h.job(steps=3), h.job(steps=3)
    h.submit(a, b, later)
    h.runner.raise_next = [RuntimeError("boom")]
    h.run()
    for job in (a, b):
        assert isinstance(job.future.exception(), GenerationFailed)
    assert h.order() == [later] and h.finished("failed") == 2
    assert h.runner.slots == {}


def test_out_of_memory_halves_the_budget_retries_in_halves_and_grows_back():
    h = Harness(max_batch_rows=8)
    jobs = [h.job(steps=3, class_id=k) for k in range(4)]
    h.submit(*jobs)
    h.runner.raise_next = [torch.OutOfMemoryError("CUDA out of memory")]
    h.run()
    assert sorted(map(id, h.order())) == sorted(map(id, jobs))  # all succeed
    subsets = [p.subset for p in h.runner.plans if p.subset]
    assert len(subsets) == 2 and sorted(subsets[0] + subsets[1]) == [0, 1, 2, 3]
    assert h.scheduler.max_rows == 4
    h.submit(h.job(steps=REGROW_AFTER_STEPS + 1))
    h.run()
    assert h.scheduler.max_rows == 8


def test_a_device_error_fails_everything_and_refuses_new_work():
    h = Harness(max_batch_rows=1)
    running, queued = h.job(steps=3), h.job(steps=3)
    h.submit(running, queued)
    h.runner.raise_next = [DeviceLost("CUDA error: an illegal memory access was encountered")]
    h.run()
    for job in (running, queued):
        assert isinstance(job.future.exception(), NotReady)
    assert h.fatal and "device error" in h.fatal[0]
    with pytest.raises(NotReady):
        h.submit(h.job())


def test_non_finite_samples_fail_their_request_at_retirement():
    h = Harness()
    bad, good = h.job(class_id=6, images=2), h.job(class_id=2)
    h.runner.nonfinite = {6}
    h.submit(bad, good)
    h.run()
    assert "non-finite" in str(bad.future.exception())
    assert h.order() == [good]


def test_a_failed_decode_fails_only_the_finishing_requests():
    h = Harness()
    short, long = h.job(steps=2), h.job(steps=5)
    h.submit(short, long)
    h.scheduler.run_once()
    h.runner.raise_next = [DecodeFailed("decoding failed: boom")]
    h.run()
    assert isinstance(short.future.exception(), GenerationFailed)
    assert h.order() == [long]


def test_queue_full_and_queue_positions():
    h = Harness(max_batch_rows=1, max_queue=3)
    jobs = [h.job(steps=2) for _ in range(3)]
    h.submit(*jobs)
    with pytest.raises(QueueFull) as e:
        h.submit(h.job())
    assert e.value.retry_after >= 1 and h.finished("rejected") == 1
    h.scheduler.run_once()
    assert [j.queue_position for j in jobs] == [None, 1, 2]
    assert jobs[0].status == "running" and jobs[1].status == "queued"
    h.run()
    assert h.order() == jobs


def test_invalid_specs_are_refused_at_submission():
    h = Harness()
    with pytest.raises(InvalidRequest):
        h.submit(h.job(class_id=10))
    with pytest.raises(InvalidRequest):
        h.submit(h.job(sampler="dpm-solver++", steps=1000))


@pytest.mark.parametrize("policy,expected_forwards", [("continuous", 6), ("request", 10), ("none", 14)])
def test_policies(policy, expected_forwards):
    h = Harness(policy=policy, max_batch_rows=8)
    h.submit(h.job(steps=4), h.job(steps=6))
    h.scheduler.run_once()
    h.submit(h.job(steps=4))  # arrives after the first step
    assert h.run() + 1 == expected_forwards


def test_stop_finishes_what_was_accepted_on_the_engine_thread():
    h = Harness()
    jobs = [h.job(steps=3) for _ in range(3)]
    h.submit(*jobs)
    h.scheduler.start()
    h.scheduler.stop(timeout=30)
    assert h.order() == jobs
    with pytest.raises(NotReady):
        h.submit(h.job())


# ddim 10 steps: t = 999, 888, ..., 111, 0; [0.5, 1] guides the first 5 (t >= 499.5), [0, 0.5] the last 5.
EARLY, LATE = (0.5, 1.0), (0.0, 0.5)


def test_narrow_intervals_admit_more_samples_and_keep_every_step_within_the_budget():
    def run(interval):
        h = Harness(max_batch_rows=4)
        jobs = [h.job(class_id=k, steps=10, cfg=3.0, interval=interval) for k in range(5)]
        h.submit(*jobs)
        steps = h.run()
        assert sorted(map(id, h.order())) == sorted(map(id, jobs))
        assert h.runner.max_rows_seen <= 4
        return h.runner.max_samples_seen, steps

    assert run((0.0, 1.0)) == (2, 30)  # 2 rows each at every step: two at a time
    # guided early only: a sample joins as soon as its guided steps meet the others' unguided ones
    assert run(EARLY) == (3, 25)


def test_admission_looks_ahead_to_a_sample_s_guided_steps():
    h = Harness(max_batch_rows=3)
    late = h.job(class_id=1, steps=10, cfg=3.0, interval=LATE)  # 1 row for 5 steps, then 2
    h.submit(late)
    h.scheduler.run_once()
    # 1 + 1 rows would fit at step 2, but its guided steps 7..11 would meet the first's (2 + 2 > 3): it
    # joins at step 6, where its unguided steps 6..10 meet the first's guided ones (2 + 1 = 3)
    h.submit(h.job(class_id=2, steps=10, cfg=3.0, interval=LATE))
    h.run()
    assert h.runner.max_rows_seen == 3
    assert [k + 1 for k, p in enumerate(h.runner.plans) if p.joins] == [1, 6]  # full guidance: [1, 11]


def test_mixed_intervals_never_exceed_the_budget_and_the_accounting_returns_to_zero():
    h = Harness(max_batch_rows=7)
    intervals = [(0.0, 1.0), EARLY, LATE, (0.3, 0.6), (0.45, 0.55)]
    jobs = [h.job(class_id=k % 10, steps=3 + k % 9, images=1 + k % 3, cfg=[1.0, 2.0, 4.0][k % 3],
                  sampler=["ddim", "ddpm", "dpm-solver++"][k % 4 % 3], interval=intervals[k % 5]) for k in range(15)]
    h.submit(*jobs[:10])
    for _ in range(4):
        h.scheduler.run_once()
    victim = next(j for j in jobs if j.status == "running" and j.spec.steps > 6)
    victim.cancel()  # frees its future rows
    h.submit(*jobs[10:])
    h.run()
    assert h.runner.max_rows_seen <= 7
    # the scheduler's rows of each step are the runner's (observed by dit_forward_rows)
    assert h.metrics.forward_rows._sum.get() == sum(h.runner.rows_per_step)
    assert h.scheduler._ahead == {} and h.scheduler._inflight_work == 0
    assert len(h.order()) == 14


def test_the_load_counts_the_backlog_s_rows_each_sample_once():
    """What admission drains the backlog at (Load.rows): queued samples at their mean width, admitted ones
    at their next step's rows; a request admitted in part counts each sample on one side only."""
    h = Harness(max_batch_rows=8)
    jobs = [h.job(images=3, steps=4, cfg=2.0) for _ in range(5)]  # guided throughout: 2 rows a sample
    h.submit(*jobs)
    load = h.scheduler.load()
    assert (load.rows, load.requests, load.work, load.one_at_a_time) == (30.0, 5, 5 * 3 * 4 * 2, False)
    h.scheduler.run_once()  # round-robin: one sample each of 4 requests fills the 8 rows
    load = h.scheduler.load()
    assert load.rows == pytest.approx(30.0) and load.work == 5 * 3 * 4 * 2 - 4 * 2  # one step of 4 computed
    h.run()
    load = h.scheduler.load()
    assert (load.rows, load.requests, load.work, h.scheduler._waiting_rows) == (0.0, 0, 0, 0.0)


def test_under_policy_none_the_backlog_drains_one_request_at_a_time():
    h = Harness(max_batch_rows=8, policy="none")
    h.submit(*[h.job(images=2, steps=4, cfg=2.0) for _ in range(4)])  # 4 rows each, alone
    for _ in range(3):  # the first request's first 3 steps
        h.scheduler.run_once()
        h.clock.now += 0.005
    load = h.scheduler.load()
    assert load.one_at_a_time and load.requests == 4 and load.rows == pytest.approx(16.0)
    step = load.step_seconds(4)
    assert load.drain_seconds(load.work) == pytest.approx(load.work / 4 * step)  # 4 rows a step, not 8
    h.run()


def test_the_load_reports_a_full_width_step_s_wall_time_with_the_time_between_steps():
    h = Harness(max_batch_rows=8)
    assert not h.scheduler.load().measured  # admission estimates nothing yet
    h.submit(h.job(images=4, steps=12))  # 4 rows per step: half the budget
    for _ in range(12):
        h.scheduler.run_once()  # each step: 10 ms in the runner...
        h.clock.now += 0.005  # ...and 5 ms of the engine's own work before the next one
    load = h.scheduler.load()
    assert load.max_rows == 8 and load.step_seconds(8) == pytest.approx(2 * 0.015)  # one width seen: x 8 / 4 rows
    h.run()
    assert h.scheduler.run_once() is False
    h.clock.now += 60  # an idle minute is no step's cost
    h.submit(h.job(images=4, steps=3))
    for _ in range(3):
        h.scheduler.run_once()
        h.clock.now += 0.005
    assert h.scheduler.load().step_seconds(8) == pytest.approx(2 * 0.015)
