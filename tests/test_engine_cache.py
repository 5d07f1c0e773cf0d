"""Step caching in the engine, with a fake runner and a fake clock: a cached request's rows timeline holds 0
at its skipped steps, so more samples fit in the row budget; the budget holds when a runner skips even
more than the timeline says (an adaptive cache: the timeline is an upper bound); the rows metric counts the
rows that were computed, not those planned."""

from __future__ import annotations

import random

from test_engine_core import FakeRunner, Harness

from model.cache import Cache
from model.denoise import rows_per_iteration
from model.samplers import Sampling
from server.engine.contract import StepPlan, StepResult
from server.engine.request import EngineRequest

TAYLOR3 = Cache("taylor", every=3, order=2)


class CachingRunner(FakeRunner):
    """Counts a sample's rows from its cached timeline; `adaptive` also skips some computed steps at random
    (as a rule that decides from the data would), and reports the rows it ran."""

    def __init__(self, clock, adaptive: bool):
        super().__init__(clock)
        self.adaptive = adaptive
        self.rng = random.Random(0)
        self.ran: list[int] = []

    def _rows(self, join, done):
        s = join.sampling
        rows = rows_per_iteration(s.sampler, s.steps, s.cfg_scale, s.guidance_interval, s.cache)[done]
        return 0 if self.adaptive and rows and self.rng.random() < 0.3 else rows

    def execute(self, plan: StepPlan) -> StepResult:
        steps_before = len(self.rows_per_step)
        result = super().execute(plan)
        ran = self.rows_per_step[-1] if len(self.rows_per_step) > steps_before else 0
        self.ran.append(ran)
        return StepResult(result.finished, result.finite, result.pixels, result.previews, result.decode_seconds,
                          rows=ran)


def _harness(adaptive: bool, max_batch_rows=8) -> Harness:
    h = Harness(max_batch_rows=max_batch_rows)
    h.runner = CachingRunner(h.clock, adaptive)
    h.core.runner = h.runner
    return h


def _request(h: Harness, n: int, cache, steps=9, cfg=4.0) -> EngineRequest:
    now = h.clock.now
    r = EngineRequest(str(n), 1, (n,), Sampling("ddim", steps, cfg, (0.0, 1.0), cache), now, now + 600)
    h.requests.append(r)
    return r


def test_a_cached_timeline_has_zero_rows_at_skipped_steps_and_admits_more():
    r = _request(Harness(), 1, TAYLOR3)
    assert r.timeline == (2, 0, 0, 2, 0, 0, 2, 0, 0) and r.row_steps == 6 and r.mean_rows == 6 / 9
    in_flight, steps = {}, {}
    for cache in ("off", TAYLOR3):
        h = _harness(adaptive=False)
        h.submit(*[_request(h, n, cache) for n in range(1, 13)])
        steps[str(cache)] = h.run()
        in_flight[str(cache)] = h.runner.max_samples_seen
        assert len(h.requests) == 12 and all(h.end(r).error is None for r in h.requests)
        assert h.runner.max_rows_seen <= 8
        assert h.runner.ran == h.runner.rows_per_step  # a fixed schedule: the timeline was exact
    # uncached: 4 guided samples fill 8 rows; cached, samples whose computed steps fall apart share the rows
    assert in_flight["off"] == 4 and in_flight[str(TAYLOR3)] > 4 and steps[str(TAYLOR3)] < steps["off"]


def test_the_budget_holds_with_adaptive_skipping_and_the_metric_counts_computed_rows():
    h = _harness(adaptive=True)
    h.submit(*[_request(h, n, cache, steps=6 + n % 5, cfg=1.0 + n % 3)
               for n, cache in enumerate([TAYLOR3, "off", Cache("reuse", every=2), TAYLOR3] * 6, start=1)])
    h.run()
    assert len(h.requests) == 24 and all(h.end(r).error is None for r in h.requests)
    assert h.runner.max_rows_seen <= 8
    ran = sum(h.runner.ran)
    planned = sum(r.row_steps for r in h.requests)
    assert 0 < ran < planned  # the adaptive runner skipped rows the timeline held
    assert h.metrics.forward_rows_total._value.get() == ran
    assert h.metrics.forward_rows._sum.get() == ran


def test_samples_that_leave_early_give_back_their_rows_around_cached_steps():
    """Two samples that leave before steps their cache skips: each refund leaves the timeline whole (the
    second once found the skipped step's entry gone and stopped the engine)."""
    from server.engine.slots import SlotTable

    def request(name):
        r = EngineRequest(name, 1, (0,), Sampling("ddim", 4, 1.0), 0.0, 60.0)
        r.__dict__["timeline"] = (1, 0, 0, 1)  # computed, two cached steps, computed
        return r

    table = SlotTable()
    slots = [table.take(request("a"), 0), table.take(request("b"), 0)]
    assert [table.rows(t) for t in range(1, 5)] == [2, 0, 0, 2]
    table.advance()
    table.release(slots[0])
    assert [table.rows(t) for t in range(2, 5)] == [0, 0, 1]
    table.release(slots[1])
    assert table.ahead == {1: 2}  # the running step's rows leave with past()
    table.past()
    assert table.ahead == {}


def _beside_a_dataset(steps: int) -> Harness:
    """An engine at 100 ms a step + 15 ms a row that has run one step of a dataset's six samples alone."""
    h = _harness(adaptive=False)
    h.core.scheduler.step_cost = lambda: (0.1, 0.015)
    dataset = _request(h, 1, "off", steps=steps, cfg=1.0)
    dataset.seeds = tuple(range(6))
    dataset.background = True
    h.submit(dataset)
    h.step()
    return h


def test_background_samples_leave_a_cached_interactive_samples_skipped_steps_nearly_free():
    """An interactive sample at a step its cache skips (0 rows) is still in flight: background samples take
    only what keeps that step within BACKGROUND_SLOWDOWN of its cost without them, not the allowance of an
    engine with nothing interactive (which made a cached request's skipped steps the slowest of all)."""
    h = _beside_a_dataset(steps=20)  # alone: every background sample runs
    late = _request(h, 2, TAYLOR3, steps=9, cfg=1.0)  # rows (1, 0, 0, 1, 0, 0, 1, 0, 0)
    h.submit(late)
    for _ in range(4):
        h.step()
    background = {j.slot for j in h.runner.plans[0].joins}
    ran = [len(background & set(p.subset or background)) for p in h.runner.plans[1:5]]
    # 1 interactive row: 1.2 x 115 ms allows 2.5 rows (one background); 0 rows: 0.2 x 100 ms, 1.3 rows (one);
    # with nothing interactive in flight it would have been all six
    assert ran == [1, 1, 1, 1], ran


def test_background_steps_stay_small_for_a_grace_period_after_interactive_work():
    """Interactive requests come in runs: one that arrives during a full-size background step waits for it,
    so for BACKGROUND_GRACE_SECONDS after interactive work background steps stay as small as beside it."""
    from server.engine.scheduler import BACKGROUND_GRACE_SECONDS

    h = _beside_a_dataset(steps=40)
    background = {j.slot for j in h.runner.plans[0].joins}
    late = _request(h, 2, "off", steps=2, cfg=1.0)
    h.submit(late)
    h.step()
    h.step()  # its last step
    assert h.end(late).error is None

    def running() -> int:
        h.step()
        plan = h.runner.plans[-1]
        return len(background & set(plan.subset)) if plan.subset else len(background)

    assert running() == 1  # within the grace: 0.2 x 100 ms of background rows (one, at least one runs)
    h.clock.now += BACKGROUND_GRACE_SECONDS
    assert running() == 6  # after it: the alone allowance, every background sample
