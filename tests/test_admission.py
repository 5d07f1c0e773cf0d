"""Admission at the front door, with plain numbers: no server, no clock."""

from __future__ import annotations

import pytest

from server.admission import HEADROOM, Admission, seconds_to_finish
from server.contracts import GenerationSpec, Job, KeyQuotaExceeded, OutputSpec, Overloaded, QueueFull
from server.engine.messages import Load

NOW = 100.0


def job(steps=10, images=1, cfg=1.0, timeout=5.0, owner=None) -> Job:
    return Job(GenerationSpec(1, cfg, steps, "ddim", tuple(range(images))), OutputSpec(), deadline=NOW + timeout,
               owner=owner)


def load(waiting=0, work=0, row_step=0.001, step=0.02, max_rows=32) -> Load:
    return Load(waiting=waiting, work=work, row_step_seconds=row_step, step_seconds=step, max_rows=max_rows)


def test_an_idle_server_admits():
    Admission(8, None).check(job(), load(), 0, NOW)


def test_nothing_is_estimated_before_a_step_was_measured():
    assert seconds_to_finish(job(steps=1000), load(step=0.0)) is None
    Admission(8, None).check(job(steps=1000, timeout=0.1), load(step=0.0), 0, NOW)


def test_a_request_that_cannot_meet_its_deadline_is_refused_with_an_honest_retry_after():
    # 64 000 row-steps ahead at 1 ms each (or 2000 steps of 32 rows at 20 ms): about 40-64 s > 5 s.
    with pytest.raises(Overloaded) as e:
        Admission(256, None).check(job(timeout=5.0), load(work=64_000), 0, NOW)
    assert e.value.status == 429 and e.value.code == "overloaded"
    estimate = seconds_to_finish(job(), load(work=64_000))
    assert e.value.retry_after == pytest.approx(estimate - 5.0 * HEADROOM, abs=1.0)  # when it would fit


def test_its_own_steps_alone_can_exceed_the_deadline():
    busy = load(work=10, step=0.02)
    with pytest.raises(Overloaded):
        Admission(256, None).check(job(steps=500, timeout=5.0), busy, 0, NOW)  # 500 x 20 ms = 10 s
    Admission(256, None, deadline_aware=False).check(job(steps=500, timeout=5.0), busy, 0, NOW)


def test_an_idle_engine_admits_anything_so_a_stale_estimate_cannot_lock_it_out():
    Admission(256, None).check(job(steps=500, timeout=5.0), load(step=5.0), 0, NOW)


def test_queue_full_and_the_key_quota():
    with pytest.raises(QueueFull) as e:
        Admission(8, None).check(job(), load(waiting=8), 0, NOW)
    assert e.value.code == "queue_full" and e.value.retry_after >= 1
    with pytest.raises(KeyQuotaExceeded) as e:
        Admission(8, 2).check(job(owner="k"), load(), 2, NOW)
    assert e.value.code == "key_quota_exceeded"
    Admission(8, 2).check(job(owner="k"), load(), 1, NOW)
    Admission(8, 2).check(job(owner=None), load(), 5, NOW)  # no keys configured: no quota
