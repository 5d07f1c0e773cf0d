"""The front-end's handle on a Ray fleet (server/transport/ray/client.py), in-process with a fake
deployment handle: every way a call to a replica can end ends its request, exactly once, with the right
output (pixels, or an error of the right kind)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray is not installed: make test installs it (pip install -e '.[ray]')")

from ray.exceptions import RayActorError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from model.samplers import Sampling  # noqa: E402
from server.engine.backlog import Load  # noqa: E402
from server.engine.request import (  # noqa: E402
    EngineRequest,
    ErrorKind,
    FinishReason,
    RequestError,
    RequestOutput,
    RequestStatus,
)
from server.settings import Settings  # noqa: E402
from server.transport.ray.client import FleetEngine  # noqa: E402
from server.transport.ray.messages import STALE_SECONDS, Report  # noqa: E402

PIXELS = np.zeros((1, 4, 4, 3), np.uint8)
WAIT = 10.0  # the longest any wait here may take; an answer normally comes in milliseconds
_ids = itertools.count()


# ---- stream items: built for whichever request the call carries --------------------------------------------
def queued(position: int):
    return lambda r: RequestOutput(r.id, RequestStatus.QUEUED, 0, queue_position=position)


def running(replica: str, step: int):
    return lambda r: RequestOutput(r.id, RequestStatus.RUNNING, step, replica=replica)


def finished(replica: str):
    return lambda r: RequestOutput(r.id, RequestStatus.FINISHED, r.steps, pixels=PIXELS,
                                   timings={"queue": 0.0, "denoise": 0.01, "decode": 0.0}, replica=replica)


def refused(replica: str, kind: ErrorKind = ErrorKind.QUEUE_FULL):
    """A replica's refusal before its engine took the request (what EngineReplica.run yields then)."""
    return lambda r: RequestOutput(r.id, RequestStatus.FINISHED, 0, error=RequestError(kind, "no room"),
                                   replica=replica)


HANG = "hang"


class Stream:
    """One call's answer, as a Serve streaming response: its items, then an exception, a hang, or its end.
    An asyncio.Event among the items holds the stream there until it is set."""

    def __init__(self, items=(), end=None):
        self.items, self.end = list(items), end
        self.request: EngineRequest | None = None
        self.cancelled = False  # the client cancelled the call
        self.closed = False  # the replica's side of the call is over (ran out, raised, or was cancelled)

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        try:
            for item in self.items:
                if isinstance(item, asyncio.Event):
                    await item.wait()
                else:
                    yield item(self.request)
            if self.end == HANG:
                await asyncio.sleep(3600)
            elif self.end is not None:
                raise self.end
        finally:
            self.closed = True

    def cancel(self):
        self.cancelled = True


class Handle:
    """A deployment handle whose calls answer with the streams given, in order."""

    def __init__(self, *streams: Stream):
        self.streams, self.calls = list(streams), []

    def options(self, stream: bool):
        assert stream
        return self

    @property
    def run(self):
        return self

    def remote(self, request: EngineRequest) -> Stream:
        stream = self.streams.pop(0)
        stream.request = request
        self.calls.append(stream)
        return stream


class Events:
    """The service's side: records every output; the other events are no-ops."""

    def __init__(self):
        self.outputs: list[RequestOutput] = []
        self._changed = threading.Condition()

    def on_output(self, output: RequestOutput) -> None:
        with self._changed:
            self.outputs.append(output)
            self._changed.notify_all()

    def on_status(self, text): pass
    def on_started(self, info): pass
    def on_start_failed(self, reason): pass
    def on_fatal(self, reason): pass
    def on_died(self, reason): pass
    def on_capacity(self, serving, status): pass

    def of(self, request_id: str) -> list[RequestOutput]:
        with self._changed:
            return [o for o in self.outputs if o.id == request_id]

    def ends(self, request_id: str) -> list[RequestOutput]:
        return [o for o in self.of(request_id) if o.ended]

    def wait(self, predicate, what: str):
        with self._changed:
            if not self._changed.wait_for(predicate, WAIT):
                raise AssertionError(f"no {what} within {WAIT} s; outputs: {self.outputs}")


def wait_until(predicate, what: str):
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {WAIT} s")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def fleet(loop, *streams: Stream) -> tuple[FleetEngine, Handle, Events]:
    handle, events = Handle(*streams), Events()
    engine = FleetEngine(Settings(), events, handle, "dit", "Engine")
    engine._loop = loop  # what start() takes from the app's event loop
    return engine, handle, events


def request(seconds: float = 30, cfg_scale: float = 1.0, steps: int = 2, seeds=(1,)) -> EngineRequest:
    now = time.time()
    return EngineRequest(f"r{next(_ids)}", 1, tuple(seeds), Sampling("ddim", steps, cfg_scale), arrival=now,
                         deadline=now + seconds)


def end_of(engine: FleetEngine, handle: Handle, events: Events, r: EngineRequest) -> RequestOutput:
    """The request's end, once its call is over on both sides: then exactly one end was forwarded."""
    events.wait(lambda: any(o.ended for o in events.outputs if o.id == r.id), f"end of {r.id}")
    wait_until(lambda: r.id not in engine._calls and all(s.closed for s in handle.calls), "end of the calls")
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), engine._loop).result(WAIT)  # what was due on the loop ran
    ends = events.ends(r.id)
    assert len(ends) == 1, f"{r.id} ended {len(ends)} times: {ends}"
    assert len(engine.backlog) == 0 and not engine._calls and not engine._cancels
    return ends[0]


# ---- every way a call ends ------------------------------------------------------------------------------------
def test_a_finished_request_is_delivered_and_names_its_replica(loop):
    engine, handle, events = fleet(loop, Stream([queued(1), running("Engine#a", 0), running("Engine#a", 1),
                                                 finished("Engine#a")]))
    r = request()
    engine.submit(r)
    assert r.queue_position == 1  # counted at once, before the replica says anything
    end = end_of(engine, handle, events, r)
    assert end.error is None and end.pixels is PIXELS and end.replica == "Engine#a" and end.timings["denoise"] == 0.01
    assert [o.status for o in events.of(r.id)] == ["queued", "running", "running", "finished"]
    assert len(handle.calls) == 1 and handle.calls[0].request is r and not handle.calls[0].cancelled
    engine.cancel(r.id, FinishReason.CANCELLED)  # a cancel after the end (the client went away): nothing more
    assert len(events.of(r.id)) == 4 and not engine._cancels


def test_a_replica_that_died_before_taking_a_request_passes_it_on(loop):
    first = Stream([], RayActorError())
    engine, handle, events = fleet(loop, first, Stream([running("Engine#b", 0), finished("Engine#b")]))
    r = request()
    engine.submit(r)
    end = end_of(engine, handle, events, r)
    assert end.pixels is PIXELS and end.replica == "Engine#b"
    assert [s.request for s in handle.calls] == [r, r] and first.cancelled


def test_a_replica_that_died_holding_a_request_fails_it_with_engine_died(loop):
    first = Stream([running("Engine#a", 1)], RayActorError())
    engine, handle, events = fleet(loop, first, Stream([finished("Engine#b")]))
    r = request()
    engine.submit(r)
    end = end_of(engine, handle, events, r)
    assert end.error.kind == ErrorKind.ENGINE_DIED and "Engine#a" in end.error.message and end.pixels is None
    assert end.error.retry_after is not None
    assert len(handle.calls) == 1 and first.cancelled  # not sent again: it may have run in part


def test_a_replica_that_refused_a_request_passes_it_on_once(loop):
    engine, handle, events = fleet(loop, Stream([refused("Engine#a")]), Stream([refused("Engine#b")]),
                                   Stream([finished("Engine#c")]))
    r = request()
    engine.submit(r)
    end = end_of(engine, handle, events, r)
    assert end.error.kind == ErrorKind.QUEUE_FULL and end.replica == "Engine#b" and len(handle.calls) == 2
    assert events.of(r.id) == [end]  # the first refusal is not the request's end


def test_a_refusal_that_another_replica_would_repeat_is_not_passed_on(loop):
    engine, handle, events = fleet(loop, Stream([refused("Engine#a", ErrorKind.INVALID_REQUEST)]),
                                   Stream([finished("Engine#b")]))
    r = request()
    engine.submit(r)
    end = end_of(engine, handle, events, r)
    assert end.error.kind == ErrorKind.INVALID_REQUEST and len(handle.calls) == 1


def test_every_replica_s_queue_full_at_the_router_answers_queue_full(loop):
    engine, handle, events = fleet(loop, Stream([], BackPressureError(num_queued_requests=8, max_queued_requests=8)))
    r = request()
    engine.submit(r)
    end = end_of(engine, handle, events, r)
    assert end.error.kind == ErrorKind.QUEUE_FULL and end.error.retry_after >= 1


def test_an_unexpected_error_still_answers(loop):
    engine, handle, events = fleet(loop, Stream([running("Engine#a", 0)], KeyError("a bug")))
    r = request()
    engine.submit(r)
    end = end_of(engine, handle, events, r)
    assert end.error.kind == ErrorKind.GENERATION_FAILED and "KeyError" in end.error.message


def test_a_call_that_ends_without_an_answer_still_answers(loop):
    engine, handle, events = fleet(loop, Stream([running("Engine#a", 0)]))
    r = request()
    engine.submit(r)
    end = end_of(engine, handle, events, r)
    assert end.error.kind == ErrorKind.GENERATION_FAILED and "without an answer" in end.error.message


# ---- cancels and deadlines -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("reason", "kind"), [(FinishReason.CANCELLED, ErrorKind.CANCELLED),
                                              (FinishReason.TIMED_OUT, ErrorKind.DEADLINE_EXCEEDED)])
def test_a_cancelled_request_cancels_its_call_and_ends_with_its_reason(loop, reason, kind):
    stream = Stream([running("Engine#a", 0)], HANG)
    engine, handle, events = fleet(loop, stream)
    r = request()
    engine.submit(r)
    events.wait(lambda: events.of(r.id), "first output")  # the replica holds it
    engine.cancel(r.id, reason)
    end = end_of(engine, handle, events, r)
    assert end.error.kind == kind and stream.cancelled  # the replica drops it at its next step


def test_an_end_that_crosses_a_cancel_ends_the_request_once(loop):
    """The replica's last output arrives while the client cancels: the first of the two ends the request."""
    arrived = asyncio.Event()
    stream = Stream([running("Engine#a", 1), arrived, finished("Engine#a")])
    engine, handle, events = fleet(loop, stream)
    r = request()
    engine.submit(r)
    events.wait(lambda: events.of(r.id), "first output")

    def both():  # on the event loop, as the HTTP layer cancels: the output is due before the cancel lands
        arrived.set()
        engine.cancel(r.id, FinishReason.CANCELLED)

    loop.call_soon_threadsafe(both)
    end = end_of(engine, handle, events, r)
    assert end.error is not None and end.error.kind == ErrorKind.CANCELLED
    assert [o.status for o in events.of(r.id)] == ["running", "finished"]  # nothing after the end


def test_the_deadline_covers_the_wait_for_a_replica(loop):
    stream = Stream([], HANG)  # the router never gets it to a replica
    engine, handle, events = fleet(loop, stream)
    r = request(seconds=0.3)
    deadline = r.deadline
    started = time.monotonic()
    engine.submit(r)
    end = end_of(engine, handle, events, r)
    assert end.error.kind == ErrorKind.DEADLINE_EXCEEDED and stream.cancelled
    assert time.monotonic() - started < WAIT / 2
    assert handle.calls[0].request.deadline == deadline  # the replica is told the deadline, not the whole timeout


# ---- admission's view -------------------------------------------------------------------------------------------
def test_the_fleet_s_load_spreads_its_requests_over_the_replicas_that_report(loop):
    """The requests this front-end has in the fleet, per live replica, at the step times the replicas
    measured (a replica that just started has measured none) and the smallest row budget; a request whose
    steps are done, only being decoded, holds no rows."""
    streams = [Stream([running("Engine#a", 10)], HANG)] + [Stream([running("Engine#a", 5)], HANG) for _ in range(2)]
    streams += [Stream([], HANG) for _ in range(3)]  # still with the router: queued
    engine, handle, events = fleet(loop, *streams)

    def load(fixed: float, per_row: float, max_rows: int) -> Load:
        return Load(waiting=0, work=0, rows=0.0, requests=0, one_at_a_time=False, step_fixed=fixed,
                    step_per_row=per_row, max_rows=max_rows)

    engine.on_report(Report("Engine#a", load(0.01, 0.001, 16), b""))
    engine.on_report(Report("Engine#b", load(0.03, 0.003, 32), b""))
    engine.on_report(Report("Engine#c", load(0.0, 0.0, 24), b""))  # just started
    engine.on_report(Report("Engine#d", load(1.0, 1.0, 1), b""))
    heard, report = engine._reports["Engine#d"]
    engine._reports["Engine#d"] = (heard - STALE_SECONDS - 1, report)  # silent too long: gone
    requests = [request(cfg_scale=4.0, steps=10, seeds=(1, 2)) for _ in range(6)]  # 2 images x 2 rows, 40 row-steps
    for r in requests:
        engine.submit(r)
    wait_until(lambda: len(handle.calls) == 6, "six calls")
    events.wait(lambda: len(events.outputs) == 3, "the three replicas' outputs")
    got = engine.load()
    # 3 queued (40 row-steps, 4 rows each), 2 at step 5 (20 row-steps, 4 rows), 1 decoding; over 3 replicas
    assert (got.waiting, got.work, got.rows, got.requests) == (1, -(-160 // 3), pytest.approx(20 / 3), 2)
    assert (got.step_fixed, got.step_per_row, got.max_rows) == (pytest.approx(0.02), pytest.approx(0.002), 16)
    assert not got.one_at_a_time
    for r in requests:
        engine.cancel(r.id, FinishReason.CANCELLED)
    for r in requests:
        assert end_of(engine, handle, events, r).error.kind == ErrorKind.CANCELLED
    assert all(s.cancelled for s in handle.calls)
