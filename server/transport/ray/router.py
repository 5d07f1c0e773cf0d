"""The engine deployment's request router (Serve's `RequestRouter`): the chunks of one dataset shard go to
one engine replica; every other request is routed as Serve's default router does it.

A dataset's shard is made as chunks of at most 16 images (server/service/datasets.py), each one engine
request whose `affinity` names the shard. Serve's default router (power of two choices) would spread the
chunks of one shard over the replicas, so killing any replica would cost a piece of nearly every shard in
flight. Here a request with an affinity goes to the replica that affinity was first given to, while that
replica is alive; a new affinity goes to the live replica holding the fewest live affinities (ties: the
shorter queue, then chance), so shards spread evenly and each replica works on whole shards. A replica
killed mid-shard fails its chunks with `engine_died`; the dataset sends them again, and since the replica
is no longer among Serve's live replicas, its affinities move on to live ones.

The choice is made when Serve asks this router for candidates (`choose_replicas`), before the request is
sent, and the router runs on one event loop: two chunks of a new shard routed at the same moment see the
same answer. When the shard's replica is full, the chunk waits for it (with Serve's backoff) rather than
going elsewhere: the dataset keeps only a few chunks in flight, so the wait is short.

Each front-end process has its own router (Serve builds one per deployment handle per process), and a
dataset is run by one front-end, so the chunks of one shard meet in one router.

Serve's `ray.serve.request_router` API and `RequestRouterConfig` (a deployment option) are Ray 2.48's, the
floor in pyproject.toml; the API is alpha, so a Ray upgrade runs tests/test_ray_datasets.py (slow).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from ...engine.request import EngineRequest

log = logging.getLogger(__name__)

# How long and how many affinities are remembered. An affinity is in use while its shard is made: its chunks
# come one after another, each within about one chunk's time of the last, but a background chunk waits
# behind interactive work for as long as that lasts. An hour outlasts all but long pauses; forgetting
# would only let a shard's later chunks land on another replica (the shard is still whole and right, it
# just loses the one-replica bound on a kill). 10,000 entries (about a megabyte) is far more than the
# shards one front-end has in flight; beyond it the least recently used go first.
REMEMBER_SECONDS = 3600.0
REMEMBER_MAX = 10_000
# A replica "holds" the affinities used within this window: the shards it is making now, not every shard
# it made within the hour. Counting the hour would send every new shard to a replica that has just joined
# (or replaced a killed one) until its count caught up, while the others idle. A shard being made uses its
# affinity at least once per chunk (seconds on a GPU); where chunks take longer, the queue length breaks
# the tie, which still follows the work in flight.
ACTIVE_SECONDS = 60.0


class Affinities:
    """Which replica each affinity goes to. Pure bookkeeping on replica names (no Ray), so it is tested
    alone: `replica()` is the whole policy."""

    def __init__(self, remember_s: float = REMEMBER_SECONDS, limit: int = REMEMBER_MAX,
                 active_s: float = ACTIVE_SECONDS, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self.remember_s, self.limit, self.active_s, self.clock = remember_s, limit, active_s, clock
        self.rng = rng or random.Random()
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()  # affinity -> (replica, last used),
        # least recently used first (so forgetting takes from the front)

    def __len__(self) -> int:
        return len(self._owners)

    def replica(self, affinity: str, live: Sequence[str], queue: Callable[[str], int | None]) -> str | None:
        """The replica for a request with this affinity: the one the affinity was given to if it is live,
        else (a new affinity, or its replica gone) the live one holding the fewest affinities in use, then
        the shorter queue (`queue(name)`: requests in the replica, None where not known), then chance.
        None when no replica is live."""
        if not live:
            return None
        now = self.clock()
        self._forget(now)
        owner, _ = self._owners.pop(affinity, (None, now))
        if owner not in live:
            chosen = self._least_held(live, queue, now)
            if owner is not None:
                log.info("shard %s moves from engine replica %s (gone) to %s", affinity, owner, chosen)
            owner = chosen
        self._owners[affinity] = (owner, now)  # now the most recently used
        if len(self._owners) > self.limit:
            self._owners.popitem(last=False)
        return owner

    def held(self, now: float | None = None) -> Counter[str]:
        """Affinities in use (used within active_s) per replica."""
        now = self.clock() if now is None else now
        held: Counter[str] = Counter()
        for owner, used in reversed(self._owners.values()):  # most recent first: stop at the first too old
            if now - used > self.active_s:
                break
            held[owner] += 1
        return held

    def _least_held(self, live: Sequence[str], queue: Callable[[str], int | None], now: float) -> str:
        held = self.held(now)
        return min(live, key=lambda name: (held[name], queue(name) or 0, self.rng.random()))

    def _forget(self, now: float) -> None:
        while self._owners:
            affinity, (_, used) = next(iter(self._owners.items()))
            if now - used <= self.remember_s:
                return
            del self._owners[affinity]


def affinity_of(pending_request: PendingRequest | None) -> str | None:
    """The affinity of an engine request (`run(request)`); None for every other call (describe, faults)."""
    args = pending_request.args if pending_request is not None else ()
    return args[0].affinity if args and isinstance(args[0], EngineRequest) else None


def name_of(replica: RunningReplica) -> str:
    """A replica's name as the replica says it (replica.py: `Engine#<id>`, in X-Replica and the manifest)."""
    return f"{replica.replica_id.deployment_id.name}#{replica.replica_id.unique_id}"


class AffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve's default choice (power of two, same node first) for requests without an affinity; the
    affinity's replica for the others. No FIFOMixin: it would hand a replica chosen for one request to
    whichever request waits first, splitting a shard; without it each request gets the replica chosen for
    it (requests that wait because every replica is full are then taken as their turns come, not strictly
    in arrival order, which the engines' own queues do not need)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.affinities = Affinities()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        affinity = affinity_of(pending_request)
        if affinity is None:  # Serve's own procedure, on this router's replica set (its mixins are here)
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        # Candidates are the replicas Serve knows alive: one it found dead (a failed call, a failed probe)
        # or removed is not among them.
        by_name = {name_of(r): r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        name = self.affinities.replica(affinity, list(by_name), lambda n: cache.get(by_name[n].replica_id))
        # Its replica full: try again after Serve's backoff, not in a tight loop of queue probes.
        pending_request.routing_context.should_backoff = True
        return [[by_name[name]]] if name is not None else []
