"""The HTTP front-end's scheduling priority: below the engine process's, so that HTTP load cannot slow the
step loop (Linux; elsewhere nice alone).

nice 19 gives the front-end the smallest share of a core both want, but the kernel may still let it run on
when an engine thread wakes; torch's worker threads sleep and wake around every parallel region, and a step
waits for its slowest thread. On two cores, under a flood of requests the front-end refuses or a storm of
them, steps ran 2-71% slower than without that load at nice 19 (median 33%). The kernel preempts a
SCHED_IDLE thread as soon as a normal one wakes: -7% to +22% (median 9%; bench/overload.py, RELIABILITY.md
round 3).

Both are per thread on Linux, and a new thread inherits its creator's. This runs on the event loop's
thread after the engine was spawned (the engine keeps the priority it inherited), so the event loop
(parsing, refusing, writing every answer) and what it starts run low. The engine-reader thread, started
before, and the encoding pool, started from it, keep the normal priority: finished images are taken from
the engine and encoded at once, and wait only for the event loop to write them out.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def lower_priority(nice: int, sched_idle: bool) -> None:
    if nice:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    if sched_idle:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError) as e:  # not Linux, or a sandbox that forbids it
            log.warning("the HTTP process could not switch to SCHED_IDLE (%s): it runs at nice %d only; "
                        "start it with --no-frontend-sched-idle to silence this", e, nice)
