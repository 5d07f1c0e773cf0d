"""The async jobs (POST /jobs) in a database, so that they outlive the process: SQLite by default (one file
under --data-dir, WAL mode), PostgreSQL for fleets (--job-store postgresql://...).

One schema and one code path for both through SQLAlchemy Core: its Table objects are the schema, its
expressions write the dialect's SQL and parameter style (SQLite's `?` and psycopg's `%s`), and its pool
reconnects after a database restart (pool_pre_ping); an ORM would add nothing here. A row holds what is
needed to run the job again (the validated request: class, seeds, sampling, arrival and deadline on the
wall clock, answer form), its owner's key hash, tag, webhook URL and delivery state, its status with the
finish reason, timestamps, and, once done, its images (in the database: every front-end of a fleet reads
them). A schema newer than this code is refused with a message.

Jobs live in the database; those running in this process are also held in memory (`Job`, with their
progress), and their end is written when it comes. `--job-timeout` counts from the job's arrival, the
time the server was down included. `--job-ttl` after a job ended its row and images are deleted; at
most `--max-jobs` rows are held.

Leases: every pending job (and every ended one whose webhook is not delivered yet) has a holder, the
front-end process that runs it, and a lease that the holder renews every RENEW_SECONDS (with the job's
progress, so that a status read through another front-end is current, and reading the cancels asked
through other front-ends). A job whose lease ran out (its holder was killed, or lost the store) or that
has no holder (its holder stopped and left it, or its engine died with it) is claimed by the next
front-end that renews, in submission order, and submitted again with the same seeds: its images are
those it would have had. So a restarted server takes up what the last one left, and in a Ray fleet with
several front-ends on one PostgreSQL store a killed front-end's jobs are taken over by the others. A
holder that finds a job taken from it drops it, and writes an end only for the jobs it still holds.
Each front-end also writes a heartbeat (`dit_frontends`): a second server started on the store of a
live one is refused, unless both are front-ends of one fleet (`shared`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from model.samplers import Sampling

from ..engine.request import EngineRequest, ErrorKind, FinishReason, RequestError, RequestStatus
from .job import Job

log = logging.getLogger(__name__)

# 2: leases (holder, lease_until, cancel_requested), dit_frontends, dit_replicas. Nullable columns added later
# (ADDED_COLUMNS) need no new version: a server that does not know them leaves them alone, so the one before
# can still open the store (a rollback).
SCHEMA_VERSION = 2
PENDING = "pending"  # not ended: queued or running (in this process, or when the last one stopped)
MAX_STARTS = 3  # a job that was running when the engine died this many times fails (it may be what kills it)
RETRY_WRITE_SECONDS = 2.0  # a job's end that could not be written is tried again this often
EXPIRE_SECONDS = 60.0  # expired jobs are deleted this often (or every --job-ttl, if shorter)
LEASE_SECONDS = 10.0  # a holder unheard for this long loses its jobs to the next front-end that renews
RENEW_SECONDS = 2.0  # how often a front-end renews its leases and claims the jobs no one holds

metadata = MetaData()
meta_table = Table("dit_meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text))
jobs_table = Table(
    "dit_jobs", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # submission order
    Column("id", String(64), nullable=False, unique=True),
    Column("owner", String(128), nullable=False),  # the API key's hash; "" without keys
    Column("idempotency_key", String(256)),
    Column("fingerprint", String(64)),  # of the request an Idempotency-Key was first used with
    Column("request", Text, nullable=False),  # JSON: what it takes to run the job again
    Column("status", String(16), nullable=False),  # pending, done, failed, cancelled, timed_out
    Column("error", Text),  # JSON {kind, message, retry_after}
    Column("step", Integer, nullable=False, default=0),
    Column("timings", Text),
    Column("replica", String(256)),
    Column("tag", String(256)),
    Column("webhook_url", String(2048)),
    Column("webhook_state", String(16)),  # pending, delivered or undelivered (none without a webhook)
    Column("starts", Integer, nullable=False, default=0),  # times a process has submitted it
    Column("created", Float, nullable=False),  # wall clock
    Column("ended", Float),
    Column("holder", String(128)),  # the front-end process running it (or delivering its webhook); none: free
    Column("lease_until", Float),  # wall clock; past it, the job is free
    Column("cancel_requested", Integer, nullable=False, default=0),  # a DELETE through another front-end
    UniqueConstraint("owner", "idempotency_key"),
)
# Columns added to a table after it was first made: a store made before gets them when it is opened
# (whatever its version: a version-2 store from before datasets' webhooks lacks theirs).
ADDED_COLUMNS = {
    "dit_jobs": {"holder": "VARCHAR(128)", "lease_until": "FLOAT", "cancel_requested": "INTEGER NOT NULL DEFAULT 0"},
    "dit_datasets": {"webhook_url": "VARCHAR(2048)", "webhook_state": "VARCHAR(16)", "evaluation": "TEXT"},
    "dit_shards": {"replicas": "TEXT"},
}
frontends_table = Table(
    "dit_frontends", metadata,
    Column("holder", String(128), primary_key=True), Column("shared", Integer, nullable=False),
    Column("heartbeat", Float, nullable=False),
    Column("metrics", LargeBinary),  # a fleet front-end's own Prometheus exposition, for the others' /metrics
)
# The engine replicas' reports (a fleet's front-ends each hear some of them; all read every one here).
replicas_table = Table(
    "dit_replicas", metadata,
    Column("name", String(256), primary_key=True), Column("heard", Float, nullable=False),
    Column("report", LargeBinary, nullable=False),
)
images_table = Table(
    "dit_images", metadata,
    Column("job_id", String(64), primary_key=True), Column("k", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)


class StoreError(RuntimeError):
    """The job store cannot be used; the message says which store and what to do."""


class StoreFull(Exception):
    """`--max-jobs` jobs are held."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key already used with another request."""


def store_url(job_store: str | None, data_dir: Path) -> str:
    """The database: --job-store, or SQLite in --data-dir."""
    return job_store or f"sqlite:///{Path(data_dir).resolve() / 'jobs.db'}"


class JobStore:
    def __init__(self, url: str, ttl: float, max_jobs: int, max_per_key: int | None = None, *,
                 shared: bool = False, lease: float = LEASE_SECONDS, renew: float = RENEW_SECONDS,
                 clock: Callable[[], float] = time.time):
        """shared: this process is one front-end of a fleet, which shares the store with the others.
        clock: this host's wall clock (a test gives one that is off)."""
        self.url, self.ttl, self.max_jobs, self.max_per_key = url, ttl, max_jobs, max_per_key
        self.lease, self.renew, self.shared = lease, renew, shared
        self.where = url.split("@")[-1] if "://" in url else url  # no password in messages
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"  # this process, in leases
        self._live: dict[str, Job] = {}  # jobs of this process not yet written as ended
        self._deferred: set[str] = set()  # left pending for the next start (shutdown)
        self._written_steps: dict[str, int] = {}  # the progress last written, per live job
        self._lock = threading.Lock()
        self._clock, self._skew = clock, 0.0
        self.db = self._open(url)
        # Leases and heartbeats are written by one host and read by others: on PostgreSQL they are on the
        # database's clock (this host's, corrected by the offset measured at each renewal), so that hosts
        # whose clocks differ by more than a lease cannot take each other's live jobs.
        self._db_clock = None if url.startswith("sqlite") else select(func.extract("epoch", func.clock_timestamp()))
        self._register(shared)
        # Given the jobs claimed (on the keeper's thread); None: no claims. Claims are made only while
        # can_claim() says the engine would run them (else their starts would be counted for nothing).
        self.on_claim: Callable[[list[Job]], None] | None = None
        self.can_claim: Callable[[], bool] = lambda: True
        # Ends are written by one thread of their own: the threads that end jobs (the engine's outputs, the
        # encoders, the event loop) never wait for the database, and a write that fails is tried again.
        self._ends: queue.SimpleQueue = queue.SimpleQueue()
        self._writer_thread = threading.Thread(target=self._writer, name="job-store-writer", daemon=True)
        self._writer_thread.start()
        self._closing = threading.Event()
        self._keeper_thread = threading.Thread(target=self._keeper, name="job-store-leases", daemon=True)
        self._keeper_thread.start()

    # ---- opening ---------------------------------------------------------------------------------------
    def _open(self, url: str):
        sqlite = url.startswith("sqlite")
        if sqlite:
            path = Path(url.removeprefix("sqlite:///"))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the data directory {path.parent}: {e}; give a writable "
                                 "--data-dir (DIT_DATA_DIR)") from e
        args = {"timeout": 10} if sqlite else {"connect_timeout": 5}
        db = create_engine(url, connect_args=args, pool_pre_ping=True)
        if sqlite:
            event.listen(db, "connect", _sqlite_pragmas)
        try:
            with db.begin() as c:
                meta_table.create(c, checkfirst=True)
                version = c.execute(select(meta_table.c.value).where(meta_table.c.key == "schema")).scalar()
                if version is not None and int(version) > SCHEMA_VERSION:
                    raise StoreError(f"the job store {self.where} has schema version {version}, newer than this "
                                     f"server's ({SCHEMA_VERSION}): run the newer server, or point --job-store / "
                                     "--data-dir at another store")
                _add_columns(c, sqlite)
                metadata.create_all(c)
                if version is None:
                    c.execute(insert(meta_table).values(key="schema", value=str(SCHEMA_VERSION)))
                elif int(version) < SCHEMA_VERSION:
                    c.execute(update(meta_table).where(meta_table.c.key == "schema").values(value=str(SCHEMA_VERSION)))
        except SQLAlchemyError as e:
            hint = ("a corrupt or unwritable file: move it away (the jobs in it are lost) or give another "
                    "--data-dir" if sqlite else "is the database up and reachable, and the URL right?")
            raise StoreError(f"cannot open the job store {self.where}: {_reason(e)}; {hint}") from e
        return db

    def now(self) -> float:
        """The store's clock (unix seconds): the database's on PostgreSQL, this host's on SQLite."""
        return self._clock() + self._skew

    def _sync_clock(self, c) -> None:
        if self._db_clock is not None:
            before = self._clock()
            db_now = float(c.execute(self._db_clock).scalar())
            self._skew = db_now - (before + self._clock()) / 2

    def _register(self, shared: bool) -> None:
        """Write this process's heartbeat; refuse a store that another live server uses, unless both are
        front-ends of one fleet (two servers would each run the other's jobs as their own). A server that
        was killed left a heartbeat: one of this host that no longer runs is seen at once; one of another
        host (a re-created container) is waited for until its heartbeat is older than a lease."""
        with self.db.begin() as c:
            self._sync_clock(c)
        deadline = self.now() + self.lease + self.renew
        while True:
            now = self.now()
            with self.db.begin() as c:
                others = c.execute(select(frontends_table).where(frontends_table.c.heartbeat > now - self.lease)
                                   ).mappings().all()
                blocking = [o["holder"] for o in others if not (shared and o["shared"]) and not _gone(o["holder"])]
                if not blocking:
                    c.execute(delete(frontends_table).where(frontends_table.c.heartbeat < now - 100 * self.lease))
                    c.execute(insert(frontends_table).values(holder=self.holder, shared=int(shared), heartbeat=now))
                    return
            if now > deadline:
                raise StoreError(f"another server ({blocking[0]}) uses the job store {self.where}: stop it, or give "
                                 "this one another --data-dir or --job-store (only the front-ends of one Ray fleet "
                                 "share a store)")
            time.sleep(min(0.5, self.renew))

    # ---- jobs in -------------------------------------------------------------------------------------------
    def add(self, job: Job, *, idempotency_key: str | None = None, fingerprint: str | None = None) -> Job:
        """Write a new job (or, for an Idempotency-Key already used with the same request, return that
        job); the caller submits it next. Raises StoreFull, IdempotencyConflict or StoreError."""
        r = job.request
        row = dict(id=job.id, owner=r.owner or "", idempotency_key=idempotency_key, fingerprint=fingerprint,
                   request=json.dumps(_request_record(job)), status=PENDING, step=0, starts=1, tag=job.tag,
                   webhook_url=job.webhook_url, webhook_state="pending" if job.webhook_url else None,
                   created=job.created, holder=self.holder, lease_until=self.now() + self.lease)
        try:
            with self.db.begin() as c:
                self._expire(c)
                if idempotency_key is not None:
                    earlier = self._by_key(c, row["owner"], idempotency_key, fingerprint)
                    if earlier is not None:
                        return earlier
                held = c.execute(select(func.count()).select_from(jobs_table)).scalar()
                if held >= self.max_jobs:
                    raise StoreFull(f"{held} jobs are held (--max-jobs)")
                if self.max_per_key is not None and r.owner is not None:
                    mine = c.execute(select(func.count()).select_from(jobs_table)
                                     .where(jobs_table.c.owner == row["owner"])).scalar()
                    if mine >= self.max_per_key:
                        raise StoreFull(f"this API key holds {mine} jobs (--max-jobs-per-key)")
                c.execute(insert(jobs_table).values(**row))
        except IntegrityError:  # the same Idempotency-Key, written just now by a concurrent request
            with self.db.begin() as c:
                earlier = self._by_key(c, row["owner"], idempotency_key, fingerprint)
            if earlier is None:
                raise
            return earlier
        except SQLAlchemyError as e:
            raise self._unavailable(e) from e
        self.hold(job)
        return job

    def holds(self, job_id: str) -> bool:
        """Whether this process runs the job (else it is only in the store)."""
        return job_id in self._live

    def hold(self, job: Job) -> None:
        """Follow a job of this process: its end is written when it comes."""
        with self._lock:
            self._live[job.id] = job
        job.done.add_done_callback(lambda _: self._ended(job))

    def _by_key(self, c, owner: str, key: str, fingerprint: str | None) -> Job | None:
        row = c.execute(select(jobs_table).where(jobs_table.c.owner == owner,
                                                 jobs_table.c.idempotency_key == key)).mappings().first()
        if row is None:
            return None
        if row["fingerprint"] != fingerprint:
            raise IdempotencyConflict(f"the Idempotency-Key {key!r} was used with another request (job "
                                      f"{row['id']}); use a new key for a new request")
        return self._live.get(row["id"]) or _job_from_row(row)

    def remove(self, job_id: str) -> None:
        """Forget a job, and its images: one the engine refused at once, or one its owner deleted once ended
        (its place is free at once)."""
        with self._lock:
            self._live.pop(job_id, None)
        try:
            with self.db.begin() as c:
                c.execute(delete(images_table).where(images_table.c.job_id == job_id))
                c.execute(delete(jobs_table).where(jobs_table.c.id == job_id))
        except SQLAlchemyError as e:
            raise self._unavailable(e) from e

    # ---- jobs out ------------------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str | None) -> Job | None:
        """The job, if `owner` may see it; a job of another key is as unknown as one never submitted."""
        live = self._live.get(job_id)
        if live is not None:
            return live if live.request.owner == owner else None
        try:
            with self.db.begin() as c:
                row = c.execute(select(jobs_table).where(jobs_table.c.id == job_id,
                                                         jobs_table.c.owner == (owner or ""),
                                                         self._unexpired())).mappings().first()
        except SQLAlchemyError as e:
            raise self._unavailable(e) from e
        return None if row is None else _job_from_row(row)

    def cancel(self, job: Job) -> None:
        """Cancel a pending job that no engine of this process runs: one held by another front-end is
        flagged, and its holder cancels it at its next renewal (within RENEW_SECONDS); one no one holds
        ends cancelled here, and is not claimed."""
        now = self.now()
        try:
            with self.db.begin() as c:
                pending = (jobs_table.c.id == job.id) & (jobs_table.c.status == PENDING)
                c.execute(update(jobs_table).where(pending).values(cancel_requested=1))
                c.execute(update(jobs_table).where(pending, _free(now)).values(
                    status="cancelled", ended=now, holder=None, error=_cancelled(job.id)))
        except SQLAlchemyError as e:
            raise self._unavailable(e) from e

    def images(self, job: Job) -> list[bytes]:
        if job.images is not None:
            return job.images
        try:
            with self.db.begin() as c:
                rows = c.execute(select(images_table.c.data).where(images_table.c.job_id == job.id)
                                 .order_by(images_table.c.k)).scalars().all()
        except SQLAlchemyError as e:
            raise self._unavailable(e) from e
        return list(rows)

    def of(self, owner: str | None, limit: int) -> list[Job]:
        """The owner's jobs, newest first."""
        try:
            with self.db.begin() as c:
                rows = c.execute(select(jobs_table).where(jobs_table.c.owner == (owner or ""), self._unexpired())
                                 .order_by(jobs_table.c.seq.desc()).limit(limit)).mappings().all()
        except SQLAlchemyError as e:
            raise self._unavailable(e) from e
        return [self._live.get(row["id"]) or _job_from_row(row) for row in rows]

    def claim(self) -> tuple[list[Job], list[Job]]:
        """Take the jobs no one holds: (pending ones to submit again, in submission order; ended ones whose
        webhook is still to deliver). Each start is counted: a job started MAX_STARTS times (its engine
        died with it each time) is written as failed instead, and one cancelled meanwhile as cancelled."""
        now = self.now()
        with self.db.begin() as c:
            taken = c.execute(update(jobs_table).where(
                _free(now), (jobs_table.c.status == PENDING) | (jobs_table.c.webhook_state == "pending")).values(
                holder=self.holder, lease_until=now + self.lease,
                starts=jobs_table.c.starts + (jobs_table.c.status == PENDING).cast(Integer))
                .returning(*jobs_table.c)).mappings().all()
            runs, deliveries = [], []
            for row in sorted(taken, key=lambda row: row["seq"]):
                if row["status"] != PENDING:
                    deliveries.append(_job_from_row(row))
                    continue
                end = None
                if row["cancel_requested"]:
                    end = dict(status="cancelled", error=_cancelled(row["id"]))
                elif row["starts"] > MAX_STARTS:
                    end = dict(status="failed", error=json.dumps(
                        {"kind": "engine_died", "message": f"the engine stopped while running this job "
                         f"{row['starts'] - 1} times; it is not run again", "retry_after": None}))
                if end is None:
                    runs.append(_job_from_row(row))
                    continue
                c.execute(update(jobs_table).where(jobs_table.c.id == row["id"]).values(ended=now, **end))
                if row["webhook_state"] == "pending":  # its webhook says how it ended
                    deliveries.append(_job_from_row({**row, **end}))
        return runs, deliveries

    def delivered(self, job_id: str, ok: bool) -> None:
        self._write(job_id, webhook_state="delivered" if ok else "undelivered", holder=None, lease_until=None)

    # ---- ends ----------------------------------------------------------------------------------------------
    def defer(self, job: Job) -> bool:
        """Shutdown: if it is an async job of this store, it leaves the engine but stays pending here, for
        the next start (True); a blocking request is no job of the store (False)."""
        with self._lock:
            if job.id not in self._live:
                return False
            self._deferred.add(job.id)
            return True

    def deferred(self, job: Job) -> bool:
        return job.id in self._deferred

    def left_pending(self, job: Job) -> bool:
        """Whether the job's end is no end here: an engine that died or lost its device, or a stop that left
        it for later; its row stays pending and the next start (which an orchestrator brings) runs it again."""
        return job.id in self._deferred or (
            job.error is not None and job.error.kind in (ErrorKind.ENGINE_DIED, ErrorKind.NOT_READY))

    def _ended(self, job: Job) -> None:
        """A job ended (on the thread that ended it): its end goes to the writer."""
        self._ends.put(job)

    def _writer(self) -> None:
        """Writes ends as they come; between them, deletes what expired (reads never write)."""
        while True:
            try:
                job = self._ends.get(timeout=min(EXPIRE_SECONDS, self.ttl))
            except queue.Empty:
                self._expire_now()
                continue
            if job is None:
                return
            while not self._write_end(job):
                time.sleep(RETRY_WRITE_SECONDS)  # the store is away: the job stays held here meanwhile

    def _expire_now(self) -> None:
        try:
            with self.db.begin() as c:
                self._expire(c)
        except SQLAlchemyError as e:
            log.warning("could not delete expired jobs from the job store %s: %s", self.where, _reason(e))

    def _write_end(self, job: Job) -> bool:
        """Write the end and only then stop holding the job in memory (until then it is read from there).
        Only for a job this process still holds: one taken over by another front-end is that one's."""
        if self.left_pending(job):  # free at once, for whoever claims next (this process, once it can)
            undo = {"starts": jobs_table.c.starts - 1} if job.id in self._deferred else {}  # a stop is no crash
            self._write(job.id, holder=None, lease_until=None, **undo)
            self._forget(job.id)
            return True
        status = job.status if job.error is not None else "done"
        error = None if job.error is None else json.dumps(
            {"kind": job.error.kind.value, "message": job.error.message, "retry_after": job.error.retry_after})
        try:
            with self.db.begin() as c:
                ours = c.execute(update(jobs_table).where(jobs_table.c.id == job.id, jobs_table.c.holder == self.holder)
                                 .values(status=status, error=error, step=job.request.step,
                                         timings=json.dumps(job.timings), replica=job.replica, ended=time.time(),
                                         **self._after_end(job))).rowcount
                if ours:
                    c.execute(delete(images_table).where(images_table.c.job_id == job.id))
                    for k, data in enumerate(job.images or []):
                        c.execute(insert(images_table).values(job_id=job.id, k=k, data=data))
        except SQLAlchemyError as e:
            log.error("could not write the end of job %s to the job store %s (trying again): %s", job.id,
                      self.where, _reason(e))
            return False
        if not ours:
            log.warning("job %s ended here after another front-end took it over: its end is that one's", job.id)
        self._forget(job.id)
        return True

    def _after_end(self, job: Job) -> dict:
        """An ended job stays held while its webhook is to be delivered (by this process); else it is free."""
        if job.webhook_url is not None:
            return {"holder": self.holder, "lease_until": self.now() + self.lease}
        return {"holder": None, "lease_until": None}

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._live.pop(job_id, None)
            self._written_steps.pop(job_id, None)

    def _write(self, job_id: str, **values) -> None:
        try:
            with self.db.begin() as c:
                c.execute(update(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.holder == self.holder)
                          .values(**values))
        except SQLAlchemyError as e:
            log.error("could not update job %s in the job store %s: %s", job_id, self.where, _reason(e))

    # ---- leases -------------------------------------------------------------------------------------------
    def _keeper(self) -> None:
        """Every `renew` seconds: the heartbeat, this process's leases renewed with its jobs' progress, the
        cancels asked through other front-ends, then (once `on_claim` is set) the jobs no one holds."""
        while not self._closing.wait(self.renew):
            try:
                self._renew()
                if self.on_claim is not None and self.can_claim():
                    runs, deliveries = self.claim()
                    if runs or deliveries:
                        self.on_claim(runs + deliveries)
            except SQLAlchemyError as e:
                log.warning("could not renew the leases in the job store %s (trying again): %s", self.where,
                            _reason(e))
            except Exception:  # a bug here must not stop the renewals for good
                log.exception("renewing the job store's leases failed")

    def _renew(self) -> None:
        with self._lock:
            live = dict(self._live)
            moved = [{"job": i, "step": j.request.step} for i, j in live.items()
                     if self._written_steps.get(i) != j.request.step]
        mine = jobs_table.c.holder == self.holder
        with self.db.begin() as c:
            self._sync_clock(c)
            now = self.now()
            beat = update(frontends_table).where(frontends_table.c.holder == self.holder).values(heartbeat=now)
            if not c.execute(beat).rowcount:  # its row was removed (a long outage): written again
                c.execute(insert(frontends_table).values(holder=self.holder, shared=int(self.shared), heartbeat=now))
            c.execute(update(jobs_table).where(mine).values(lease_until=now + self.lease))
            if moved:
                c.execute(update(jobs_table).where(jobs_table.c.id == bindparam("job"), mine)
                          .values(step=bindparam("step")), moved)
            held = set(c.execute(select(jobs_table.c.id).where(mine)).scalars())
            cancels = set(c.execute(select(jobs_table.c.id).where(
                mine, jobs_table.c.status == PENDING, jobs_table.c.cancel_requested == 1)).scalars())
        with self._lock:
            self._written_steps.update((m["job"], m["step"]) for m in moved)
        for job_id, job in live.items():
            if job.ended or not self.holds(job_id):
                continue  # its end was written meanwhile
            if job_id not in held:  # its lease ran out (this process lost the store) and another took it
                log.warning("job %s was taken over by another front-end: dropped here", job_id)
                job.cancel(FinishReason.CANCELLED)
            elif job_id in cancels:
                job.cancel(FinishReason.CANCELLED)

    def put_report(self, name: str, report: bytes) -> None:
        """An engine replica's report (a fleet's front-end heard it), for every front-end to read."""
        with self.db.begin() as c:
            if not c.execute(update(replicas_table).where(replicas_table.c.name == name)
                             .values(heard=self.now(), report=report)).rowcount:
                c.execute(insert(replicas_table).values(name=name, heard=self.now(), report=report))

    def reports(self, since: float) -> list[tuple[str, float, bytes]]:
        """(replica, when heard on the store's clock, report) of the replicas heard since `since`."""
        with self.db.begin() as c:
            c.execute(delete(replicas_table).where(replicas_table.c.heard < since - 3600))
            return [tuple(r) for r in c.execute(select(replicas_table).where(replicas_table.c.heard >= since))]

    def put_metrics(self, exposition: bytes) -> None:
        """This front-end's own series, for the other front-ends of a fleet to serve beside theirs."""
        with self.db.begin() as c:
            c.execute(update(frontends_table).where(frontends_table.c.holder == self.holder)
                      .values(metrics=exposition))

    def frontend_metrics(self) -> list[tuple[str, bytes]]:
        """(holder, exposition) of the other live front-ends that shared theirs."""
        with self.db.begin() as c:
            rows = c.execute(select(frontends_table.c.holder, frontends_table.c.metrics).where(
                frontends_table.c.heartbeat > self.now() - self.lease, frontends_table.c.holder != self.holder,
                frontends_table.c.metrics.is_not(None))).all()
        return [tuple(row) for row in rows]

    def _unexpired(self):
        return jobs_table.c.ended.is_(None) | (jobs_table.c.ended >= time.time() - self.ttl)

    def _expire(self, c) -> None:
        old = select(jobs_table.c.id).where(jobs_table.c.ended < time.time() - self.ttl)
        c.execute(delete(images_table).where(images_table.c.job_id.in_(old)))
        c.execute(delete(jobs_table).where(jobs_table.c.ended < time.time() - self.ttl))

    def _unavailable(self, e: Exception) -> StoreError:
        log.error("the job store %s is unavailable: %s", self.where, _reason(e))
        return StoreError(f"the job store is unavailable ({_reason(e)}); try again shortly")

    def close(self, timeout: float = 10.0) -> None:
        """After the engine stopped: the ends still queued are written (for `timeout` s at most), what this
        process still holds is left free for the next claim, and the connections close."""
        self._closing.set()
        self._keeper_thread.join(timeout)
        self._ends.put(None)
        self._writer_thread.join(timeout)
        try:
            with self.db.begin() as c:
                c.execute(update(jobs_table).where(jobs_table.c.holder == self.holder)
                          .values(holder=None, lease_until=None))
                c.execute(delete(frontends_table).where(frontends_table.c.holder == self.holder))
        except SQLAlchemyError as e:
            log.warning("could not release this process's jobs in the job store %s (they are free in %g s): %s",
                        self.where, self.lease, _reason(e))
        self.db.dispose()


def _free(now: float):
    """Rows no one holds: no holder, or a lease run out."""
    return jobs_table.c.holder.is_(None) | (jobs_table.c.lease_until < now)


def _cancelled(job_id: str) -> str:
    return json.dumps({"kind": "cancelled", "message": f"job {job_id} was cancelled", "retry_after": None})


def _gone(holder: str) -> bool:
    """Whether a holder of this host is a process that no longer runs (a server killed and started again
    need not wait for its lease); of another host, nothing can be told."""
    host, pid, _ = holder.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return int(pid) == os.getpid()  # this process's own number: a container restarted with the same pid


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; WAL keeps it consistent
    cursor.close()


def _reason(e: Exception) -> str:
    return str(getattr(e, "orig", None) or e).strip().splitlines()[0]


def _request_record(job: Job) -> dict:
    r, s = job.request, job.request.sampling
    return {"class_id": r.class_id, "seeds": list(r.seeds), "sampler": s.sampler, "steps": s.steps,
            "cfg_scale": s.cfg_scale, "guidance_interval": list(s.guidance_interval), "cache": s.cache.describe(),
            "previews": r.previews,
            "arrival": r.arrival, "deadline": r.deadline, "owner": r.owner, "model": job.model,
            "class_name": job.class_name, "format": job.format, "separate": job.separate}


def _job_from_row(row) -> Job:
    """A job as the row holds it (ended ones with their outcome; their images are read when asked for)."""
    d = json.loads(row["request"])
    sampling = Sampling(d["sampler"], d["steps"], d["cfg_scale"], tuple(d["guidance_interval"]), d.get("cache", "off"))
    request = EngineRequest(row["id"], d["class_id"], tuple(d["seeds"]), sampling, d["arrival"], d["deadline"],
                            d["owner"], d["previews"], step=row["step"])
    job = Job(request, d["model"], d["class_name"], format=d["format"], separate=d["separate"], tag=row["tag"],
              webhook_url=row["webhook_url"], created=row["created"], replica=row["replica"],
              timings=json.loads(row["timings"] or "{}"))
    if row["status"] == PENDING:
        if row["step"]:  # running in another front-end (its holder writes its progress)
            request.status = RequestStatus.RUNNING
        return job
    request.status = RequestStatus.FINISHED
    if row["error"] is not None:
        e = json.loads(row["error"])
        job.fail(RequestError(ErrorKind(e["kind"]), e["message"], e["retry_after"]))
    else:
        job.done.set_result(None)  # done: its images are in the store
    return job


def _add_columns(c, sqlite: bool) -> None:
    """The columns of ADDED_COLUMNS that an older store's tables lack (tables it lacks are made whole). On
    PostgreSQL, IF NOT EXISTS: front-ends of a fleet starting together may both find one missing."""
    schema = inspect(c)
    for table, columns in ADDED_COLUMNS.items():
        if not schema.has_table(table):
            continue
        have = {column["name"] for column in schema.get_columns(table)}
        for name, kind in columns.items():
            if name not in have:
                c.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {'' if sqlite else 'IF NOT EXISTS '}{name} {kind}")
