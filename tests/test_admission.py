"""Admission at the front door and the backlog it reads, with plain numbers: no server, no clock."""

from __future__ import annotations

import pytest

from model.samplers import Sampling
from server.engine.admission import HEADROOM, Admission, seconds_to_finish
from server.engine.backlog import Backlog, Load
from server.engine.request import EngineOutputs, EngineRequest, ErrorKind, RequestError, RequestOutput
from server.engine.step_cost import StepCost

NOW = 100.0


def job(steps=10, images=1, cfg=1.0, timeout=5.0, owner=None, id="r") -> EngineRequest:
    return EngineRequest(id, 1, tuple(range(images)), Sampling("ddim", steps, cfg), arrival=NOW,
                         deadline=NOW + timeout, owner=owner)


def refusal(kind: ErrorKind):
    """pytest.raises for a RequestError of this kind."""
    return pytest.raises(RequestError, match=".", check=lambda e: e.kind == kind)


def load(waiting=0, work=0, step=0.02, max_rows=32, flat=False, rows=None, requests=8, one_at_a_time=False) -> Load:
    """A load whose full-width step takes `step` seconds: proportionally less at smaller widths (a CPU), or
    the same at any width (`flat`, a GPU below saturation); `rows` queued or in flight (default: enough to
    fill every step)."""
    fixed, per_row = (step, 0.0) if flat else (0.0, step / max_rows)
    return Load(waiting=waiting, work=work, rows=max_rows if rows is None else rows, requests=requests,
                one_at_a_time=one_at_a_time, step_fixed=fixed, step_per_row=per_row, max_rows=max_rows)


def test_an_idle_server_admits():
    Admission(8, None).check(job(), load(), 0, NOW)


def test_nothing_is_estimated_before_a_step_was_measured():
    assert seconds_to_finish(job(steps=1000), load(step=0.0)) is None
    Admission(8, None).check(job(steps=1000, timeout=0.1), load(step=0.0), 0, NOW)


def test_a_request_that_cannot_meet_its_deadline_is_refused_with_an_honest_retry_after():
    # 64 000 row-steps ahead: 2000 steps of 32 rows at 20 ms each, about 40 s > 5 s.
    with refusal(ErrorKind.OVERLOADED) as e:
        Admission(256, None).check(job(timeout=5.0), load(work=64_000), 0, NOW)
    estimate = seconds_to_finish(job(), load(work=64_000))
    assert e.value.retry_after == pytest.approx(estimate - 5.0 * HEADROOM, abs=1.0)  # when it would fit


def test_its_own_steps_alone_can_exceed_the_deadline():
    busy = load(work=10, step=0.02, flat=True)
    with refusal(ErrorKind.OVERLOADED):
        Admission(256, None).check(job(steps=500, timeout=5.0), busy, 0, NOW)  # 500 x 20 ms = 10 s
    Admission(256, None, deadline_aware=False).check(job(steps=500, timeout=5.0), busy, 0, NOW)


def test_an_idle_engine_admits_anything_so_a_stale_estimate_cannot_lock_it_out():
    Admission(256, None).check(job(steps=500, timeout=5.0), load(step=5.0), 0, NOW)


def test_queue_full_and_the_key_quota():
    with refusal(ErrorKind.QUEUE_FULL) as e:
        Admission(8, None).check(job(), load(waiting=8), 0, NOW)
    assert e.value.retry_after >= 1 and e.value.reason == "rejected"
    with refusal(ErrorKind.KEY_QUOTA_EXCEEDED):
        Admission(8, 2).check(job(owner="k"), load(), 2, NOW)
    Admission(8, 2).check(job(owner="k"), load(), 1, NOW)
    Admission(8, 2).check(job(owner=None), load(), 5, NOW)  # no keys configured: no quota


def test_step_cost_fits_a_cost_per_row_and_a_fixed_cost():
    cpu, gpu, one_width = StepCost(), StepCost(), StepCost()
    assert cpu.estimate == (0.0, 0.0) and cpu.seconds(32) == 0.0
    for k in range(40):
        rows = 8 + 4 * (k % 7)
        cpu.add(rows, 0.002 * rows)  # a CPU: every row costs the same
        gpu.add(rows, 0.050 + 0.0001 * rows)  # a GPU below saturation: mostly a fixed cost per step
        one_width.add(20, 0.040)
    assert cpu.seconds(32) == pytest.approx(0.064, rel=1e-6)
    assert gpu.seconds(32) == pytest.approx(0.0532, rel=1e-6) and gpu.seconds(4) == pytest.approx(0.0504, rel=1e-6)
    noisy = StepCost()  # one slow step at a small width must not make wide steps dearer than proportional
    for rows, seconds in [(16, 0.05)] * 10 + [(2, 0.2)] + [(16, 0.05)] * 10:
        noisy.add(rows, seconds)
    fixed, per_row = noisy.estimate
    assert fixed >= 0 and 0 <= per_row and noisy.seconds(16) <= noisy.seconds(2) * 8
    assert one_width.seconds(32) == pytest.approx(0.064)  # one width seen: taken as proportional to the rows


def test_step_cost_follows_the_machine_within_a_few_dozen_steps():
    cost = StepCost()
    for _ in range(50):
        cost.add(32, 0.05)
    for _ in range(60):  # the front-end takes a core: steps twice as slow
        cost.add(32, 0.10)
    assert cost.seconds(32) == pytest.approx(0.10, rel=0.05)


def test_step_cost_ignores_the_slow_steps_of_a_cold_start_and_of_a_burst_s_arrival():
    """Step cycles logged on this machine: a fresh server hit by 40 requests at once (its first steps 5-30x
    the usual), then one slow cycle later on. Wide steps cost ~50 ms and are estimated so within a few
    steps; a least-squares fit said 96-134 ms for a dozen steps more and refused requests (CI)."""
    cost = StepCost()
    cold = [(2, 585), (2, 144), (2, 112), (3, 89), (3, 33), (4, 20), (11, 48), (12, 50)]
    steady = [(12, 38), (15, 45), (16, 50), (14, 47), (12, 38), (12, 37), (16, 49), (16, 50)]
    for rows, ms in cold[:-1]:
        cost.add(rows, ms / 1000)
    assert cost.estimate == (0.0, 0.0)  # fewer than MIN_STEPS: nothing estimated
    for rows, ms in cold[-1:] + steady:
        cost.add(rows, ms / 1000)
    assert cost.seconds(16) == pytest.approx(0.050, rel=0.1)
    cost.add(8, 0.330)  # one slow cycle
    assert cost.seconds(16) == pytest.approx(0.050, rel=0.1)


def test_the_backlog_drains_in_steps_as_wide_as_its_rows_side_by_side():
    """On a GPU, where a step costs the same at any width, a thin backlog takes as many steps as a full one;
    on a CPU every row costs the same, whatever the width. One request at a time (--policy none): as wide
    as the mean request."""
    full, thin = load(work=3200, flat=True, rows=64), load(work=3200, flat=True, rows=16)
    assert full.drain_seconds(3200) == pytest.approx(100 * 0.02)  # 32 rows a step (the budget)
    assert thin.drain_seconds(3200) == pytest.approx(200 * 0.02)
    assert load(work=3200, rows=16).drain_seconds(3200) == pytest.approx(full.drain_seconds(3200))
    alone = load(work=3200, flat=True, rows=64, requests=16, one_at_a_time=True)  # 4 rows each
    assert alone.drain_seconds(3200) == pytest.approx(800 * 0.02)
    assert alone.drain_seconds(3200, extra_rows=4, extra_requests=1) == pytest.approx(800 * 0.02)
    assert load(work=0).retry_after() == 1.0 and load(work=3200, step=0.0).retry_after() == 1.0


def test_a_burst_at_a_quiet_engine_is_estimated_at_the_width_it_will_run():
    """The engine ran a few small requests (1-5 rows a step, 50 ms of each step fixed); 40 requests arrive
    at once. They drain in steps of 32 rows, not of the 3 it ran recently: estimated at the recent width, a
    burst that an idle fleet serves in seconds was refused (CI, 2026-11-28)."""
    quiet = StepCost()
    for k in range(30):
        quiet.add(1 + k % 5, 0.050 + 0.002 * (1 + k % 5))
    fixed, per_row = quiet.estimate
    assert (fixed, per_row) == (pytest.approx(0.050), pytest.approx(0.002))
    burst = [job(steps=10, images=2, cfg=4.0, timeout=30.0) for _ in range(40)]  # 4 rows, 40 row-steps each
    busy = Load(waiting=39, work=39 * 40, rows=39 * 4.0, requests=39, one_at_a_time=False, step_fixed=fixed,
                step_per_row=per_row, max_rows=32)
    assert seconds_to_finish(burst[-1], busy) == pytest.approx(1600 / 32 * (0.050 + 0.002 * 32))  # 5.7 s
    Admission(64, None).check(burst[-1], busy, 0, NOW)  # (at 3 rows a step: 533 steps, 30 s: refused)


def test_the_backlog_counts_each_request_once_from_submission_to_its_end():
    """What admission drains at (Load.rows): queued requests at their mean width, running ones at their
    next step's rows; work is the row-steps still ahead, from each request's outputs."""
    backlog = Backlog(max_rows=8, one_at_a_time=False)
    guided = [job(id=str(k), images=3, steps=4, cfg=2.0) for k in range(5)]  # 2 rows a sample at every step
    positions = [backlog.add(r) for r in guided]
    assert positions == [1, 2, 3, 4, 5]
    load = backlog.load()
    assert (load.waiting, load.rows, load.requests, load.work) == (5, 30.0, 5, 5 * 3 * 4 * 2)
    running = RequestOutput("0", "running", 1)  # request 0 admitted whole, one step done
    backlog.apply(EngineOutputs((running,), cycle=(6, 0.03), max_rows=8))
    load = backlog.load()
    assert (load.waiting, load.rows, load.work) == (4, 4 * 6 + 6.0, 4 * 24 + 3 * 3 * 2)
    backlog.apply(EngineOutputs((RequestOutput("0", "running", 4),)))  # all its steps done: only decoding
    assert backlog.load().requests == 4 and backlog.load().rows == 24.0
    backlog.apply(EngineOutputs(tuple(RequestOutput(str(k), "finished", 4) for k in range(5))))
    load = backlog.load()
    assert (load.waiting, load.work, load.rows, load.requests) == (0, 0, 0.0, 0) and len(backlog) == 0


def test_the_backlog_spreads_over_a_fleet_and_follows_the_engine_s_budget():
    backlog = Backlog(max_rows=8, one_at_a_time=True)
    for k in range(3):
        backlog.add(job(id=str(k), steps=10))
    spread = backlog.load(share=2, estimate=(0.01, 0.001), max_rows=4)
    assert (spread.waiting, spread.work, spread.rows, spread.requests) == (2, 15, 1.5, 2)
    assert spread.one_at_a_time and (spread.step_fixed, spread.step_per_row, spread.max_rows) == (0.01, 0.001, 4)
    backlog.apply(EngineOutputs((), max_rows=2))  # the engine halved its budget after an out-of-memory step
    assert backlog.load().max_rows == 2 and backlog.remove("1").id == "1" and backlog.remove("1") is None


def test_the_steps_measured_at_start_up_let_admission_estimate_from_the_first_request():
    """A fresh engine reports the steps it timed at start-up (one row and the row budget), and the backlog's
    fit starts from them: a burst at a fresh server is estimated, not admitted blindly (and timed out)."""
    from server.engine.runner import MEASURED_STEPS, ModelRunner
    from server.settings import Settings
    from server.transport.handle import EngineHandle
    from server.transport.messages import EngineInfo

    settings = Settings(max_batch_rows=8, threads=1)
    runner = ModelRunner.start(settings, on_status=lambda text: None)
    widths = [rows for rows, _ in runner.step_costs]
    assert widths[:MEASURED_STEPS] == [1] * MEASURED_STEPS and set(widths[MEASURED_STEPS:]) <= {2, 4, 8}
    assert len(set(widths)) >= 2  # a second width: the fit has a slope
    started = []
    handle = EngineHandle(settings, type("Events", (), {"on_started": lambda self, info: started.append(info)})())
    assert not handle.load().measured
    handle._started(EngineInfo.of(runner))
    assert started and handle.load().measured and handle.load().step_seconds(8) > 0
