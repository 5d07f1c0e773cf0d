"""The front-end's handle on a Ray fleet (server/fleet/client.py), in-process with a fake deployment
handle: every way a call to a replica can end answers the job, once, with the right error."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray is not installed: make test installs it (pip install -e '.[ray]')")

from ray.exceptions import RayActorError  # noqa: E402

from server.contracts import (  # noqa: E402
    Cancelled,
    DeadlineExceeded,
    EngineDied,
    FinishReason,
    GenerationFailed,
    GenerationSpec,
    Job,
    OutputSpec,
    QueueFull,
)
from server.engine import messages as msg  # noqa: E402
from server.fleet.client import FleetEngine  # noqa: E402
from server.fleet.messages import Finished, Report, Update  # noqa: E402
from server.settings import Settings  # noqa: E402

PIXELS = np.zeros((1, 4, 4, 3), np.uint8)
SPEC = GenerationSpec(class_id=1, cfg_scale=1.0, steps=2, sampler="ddim", seeds=(1,))


class Stream:
    """One call's answer: the items, then an exception or a hang, as a Serve streaming response."""

    def __init__(self, items, end=None):
        self.items, self.end, self.cancelled = list(items), end, False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for item in self.items:
            yield item
        if self.end == "hang":
            await asyncio.sleep(3600)
        elif self.end is not None:
            raise self.end

    def cancel(self):
        self.cancelled = True


class Handle:
    """A deployment handle whose calls answer with the streams given, in order."""

    def __init__(self, *streams):
        self.streams, self.requests = list(streams), []

    def options(self, stream: bool):
        return self

    @property
    def run(self):
        return self

    def remote(self, request):
        self.requests.append(request)
        return self.streams.pop(0)


class Events:
    def deliver(self, job, pixels):
        job.future.set_result(pixels)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def fleet(loop, *streams) -> tuple[FleetEngine, Handle]:
    handle = Handle(*streams)
    engine = FleetEngine(Settings(), Events(), handle, "dit", "Engine")
    engine._loop = loop  # what start() takes from the app's event loop
    return engine, handle


def job(seconds: float = 30) -> Job:
    return Job(SPEC, OutputSpec(), deadline=time.monotonic() + seconds)


def outcome(j: Job):
    try:
        return j.future.result(timeout=10)
    except Exception as e:
        return e


def test_a_finished_request_is_delivered_and_names_its_replica(loop):
    engine, _ = fleet(loop, Stream([Update("Engine#a", 0, 1, None), Update("Engine#a", 2, None, 0.01),
                                    Finished(PIXELS, 0.02, 0.01, 0.0)]))
    j = job()
    engine.submit(j)
    assert outcome(j) is PIXELS and j.replica == "Engine#a" and j.timings.admitted is not None
    assert not engine._inflight


def test_a_replica_that_died_before_taking_a_request_passes_it_on(loop):
    engine, handle = fleet(loop, Stream([], RayActorError()), Stream([Update("Engine#b", 0, None, 0.0),
                                                                      Finished(PIXELS, 0.0, 0.0, 0.0)]))
    j = job()
    engine.submit(j)
    assert outcome(j) is PIXELS and j.replica == "Engine#b" and len(handle.requests) == 2


def test_a_replica_that_died_holding_a_request_fails_it_with_503(loop):
    first = Stream([Update("Engine#a", 1, None, 0.0)], RayActorError())
    engine, handle = fleet(loop, first)
    j = job()
    engine.submit(j)
    error = outcome(j)
    assert isinstance(error, EngineDied) and "Engine#a" in str(error) and len(handle.requests) == 1
    assert first.cancelled


def test_a_replica_that_refused_a_request_passes_it_on_once(loop):
    full = msg.Failed.of(0, QueueFull("full", retry_after=2), None)
    engine, handle = fleet(loop, Stream([full]), Stream([full]))
    j = job()
    engine.submit(j)
    assert isinstance(outcome(j), QueueFull) and len(handle.requests) == 2


def test_an_unexpected_error_still_answers_the_job(loop):
    engine, _ = fleet(loop, Stream([Update("Engine#a", 0, 1, None)], KeyError("a bug")))
    j = job()
    engine.submit(j)
    error = outcome(j)
    assert isinstance(error, GenerationFailed) and "KeyError" in str(error)
    assert not engine._inflight


def test_a_cancelled_job_cancels_its_call(loop):
    stream = Stream([Update("Engine#a", 0, None, 0.0)], "hang")
    engine, _ = fleet(loop, stream)
    j = job()
    engine.submit(j)
    time.sleep(0.2)
    j.cancel(FinishReason.CANCELLED)
    assert isinstance(outcome(j), Cancelled)
    deadline = time.monotonic() + 5
    while not stream.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.cancelled and not engine._inflight


def test_the_deadline_covers_the_wait_for_a_replica(loop):
    stream = Stream([], "hang")  # the router never gets it to a replica
    engine, handle = fleet(loop, stream)
    j = job(seconds=0.3)
    engine.submit(j)
    assert isinstance(outcome(j), DeadlineExceeded) and stream.cancelled
    assert 0 < handle.requests[0].seconds_left <= 0.3  # the replica is told what is left, not the whole timeout


def test_the_fleet_s_load_spreads_its_requests_over_the_replicas_that_report(loop):
    """Admission's view of a fleet: the requests this front-end has in it, per live replica, at the rows
    they run side by side (a request whose steps are done, only being encoded, holds none)."""
    engine, _ = fleet(loop)
    measured = msg.Load(waiting=0, work=0, rows=0.0, requests=0, one_at_a_time=False, step_fixed=0.01,
                        step_per_row=0.001, max_rows=16)
    for name in ("Engine#a", "Engine#b"):
        engine.on_report(Report(name, measured, b""))
    guided = GenerationSpec(class_id=1, cfg_scale=4.0, steps=10, sampler="ddim", seeds=(1, 2))  # 4 rows
    jobs = [Job(guided, OutputSpec(), deadline=time.monotonic() + 30) for _ in range(6)]
    jobs[0].progress = guided.steps  # encoding
    engine._inflight.update(dict.fromkeys(jobs))
    load = engine.load()
    assert (load.rows, load.requests, load.work) == (5 * 4 / 2, 3, 5 * 40 // 2)
    assert (load.step_fixed, load.step_per_row, load.max_rows) == (0.01, 0.001, 16)
