"""Async jobs that outlive the process: the job store in a real SQLite file (and, where Debian's
postgresql package is installed, a real PostgreSQL server), through the real server, killed and stopped
for real. A job answered 202 ends once, with its result, across a kill -9 and across a SIGTERM; a
retry with the same Idempotency-Key is the same job; a store that cannot be used stops the server at
once with a message; a store that goes away while serving answers 503 store_unavailable to job
requests only, and the server recovers when it returns."""

from __future__ import annotations

import io
import re
import signal
import sqlite3
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image
from server_harness import ROOT, run_server, wait_until

# 1 row: one job runs at a time, the others queue behind it. The first job is long (1000 DDIM steps, a few
# seconds on the CPU), so that while it is at less than half of its steps every job is still unfinished.
ARGS = ("--max-batch-rows", "1", "--max-steps", "1000", "--no-deadline-admission")
JOB = {"steps": 20, "sampler": "ddim", "cfg_scale": 1.0, "cache": "off"}  # a row at every step: one job at a time
LONG = 1000


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def body(k: int) -> dict:
    return dict(JOB, class_id=k, seed=100 + k, steps=LONG if k == 0 else JOB["steps"])


def submit_jobs(url: str, n: int) -> list[str]:
    return [httpx.post(url + "/jobs", json=body(k), timeout=30).json()["id"] for k in range(n)]


def first_job_early(url: str, job_id: str) -> bool:
    """The first job runs and has more than half of its steps to go: none of the jobs has ended."""
    status = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
    return status["status"] == "running" and status["step"] < LONG // 2


def resumed(logs: str) -> int:
    """Jobs the server took up from the store (its claims: one batch per lease that ran out together)."""
    return sum(int(n) for n in re.findall(r"resumed (\d+) async jobs", logs))


def statuses(url: str, ids: list[str]) -> list[str]:
    return [httpx.get(f"{url}/jobs/{i}", timeout=30).json()["status"] for i in ids]


def check_done_as_alone(url: str, ids: list[str]) -> None:
    """Every job ends done, with the images of the same request run alone (within one grey level)."""
    wait_until(lambda: all(s == "done" for s in statuses(url, ids)), 180, "every job to end done")
    for k, job_id in enumerate(ids):
        result = httpx.get(f"{url}/jobs/{job_id}/result", timeout=30)
        alone = httpx.post(url + "/generate", json=body(k), timeout=60)
        assert result.status_code == alone.status_code == 200
        assert np.abs(pixels(result.content) - pixels(alone.content)).max() <= 1, job_id


@pytest.mark.slow
def test_kill_9_loses_no_job(tmp_path):
    data = ["--data-dir", str(tmp_path / "store")]
    with run_server(tmp_path, *ARGS, *data) as s:
        ids = submit_jobs(s.url, 4)
        wait_until(lambda: first_job_early(s.url, ids[0]), 30, "the first job to run")
        s.proc.kill()  # no drain, no goodbye
        s.proc.wait(30)
    with run_server(tmp_path, *ARGS, *data) as s:
        wait_until(lambda: resumed(s.logs()) == 4, 30, "the jobs to be resumed")  # once ready, leases run out
        check_done_as_alone(s.url, ids)


@pytest.mark.slow
def test_sigterm_leaves_queued_jobs_for_the_next_start(tmp_path):
    data = ["--data-dir", str(tmp_path / "store")]
    with run_server(tmp_path, *ARGS, *data) as s:
        ids = submit_jobs(s.url, 3)
        wait_until(lambda: first_job_early(s.url, ids[0]), 30, "the first job to run")
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) in (0, -signal.SIGTERM)
        logs = s.logs()
    assert "2 queued async jobs left for the next start" in logs and "engine_died" not in logs, logs
    with run_server(tmp_path, *ARGS, *data) as s:
        check_done_as_alone(s.url, ids)  # the first finished in the drain; the other two run now


def test_idempotency_key_returns_the_same_job_and_refuses_another_body(tmp_path):
    with run_server(tmp_path, *ARGS) as s, s.client() as c:
        first = c.post("/jobs", json=dict(JOB, class_id=1, seed=5), headers={"Idempotency-Key": "order-17"})
        again = c.post("/jobs", json=dict(JOB, class_id=1, seed=5), headers={"Idempotency-Key": "order-17"})
        assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
        other = c.post("/jobs", json=dict(JOB, class_id=2, seed=5), headers={"Idempotency-Key": "order-17"})
        assert other.status_code == 422 and other.json()["error"]["field"] == "idempotency-key"
        assert len(c.get("/jobs").json()["jobs"]) == 1


def test_max_jobs_is_counted_in_the_store_across_restarts(tmp_path):
    data = ["--data-dir", str(tmp_path / "store"), "--max-jobs", "2"]
    with run_server(tmp_path, *ARGS, *data) as s:
        submit_jobs(s.url, 2)
    with run_server(tmp_path, *ARGS, *data) as s:
        full = httpx.post(s.url + "/jobs", json=dict(JOB, class_id=3), timeout=30)
        assert full.status_code == 429 and full.json()["error"]["code"] == "too_many_jobs"


def test_finished_jobs_expire_with_their_images(tmp_path):
    store = tmp_path / "store"
    with run_server(tmp_path, *ARGS, "--data-dir", str(store), "--job-ttl", "1") as s:
        job_id = httpx.post(s.url + "/jobs", json=dict(JOB, class_id=1, steps=3), timeout=30).json()["id"]
        wait_until(lambda: statuses(s.url, [job_id]) == ["done"], 30, "the job to end")
        wait_until(lambda: httpx.get(f"{s.url}/jobs/{job_id}").status_code == 404, 30, "the job to expire")
    with sqlite3.connect(store / "jobs.db") as db:
        assert db.execute("select count(*) from dit_jobs").fetchone()[0] == 0
        assert db.execute("select count(*) from dit_images").fetchone()[0] == 0


def _start(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "--port", "0", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_a_store_that_cannot_be_used_stops_the_server_at_once(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "jobs.db").write_bytes(b"this is not a database" * 100)
    out = _start(tmp_path, "--data-dir", str(corrupt))
    assert out.returncode == 1 and "cannot open the job store" in out.stderr and "--data-dir" in out.stderr
    newer = tmp_path / "newer"
    newer.mkdir()
    with sqlite3.connect(newer / "jobs.db") as db:
        db.execute("create table dit_meta (key varchar(64) primary key, value text)")
        db.execute("insert into dit_meta values ('schema', '99')")
    out = _start(tmp_path, "--data-dir", str(newer))
    assert out.returncode == 1 and "schema version 99, newer than this server's" in out.stderr
    blocked = tmp_path / "file"
    blocked.write_text("a file where the data directory should be")
    out = _start(tmp_path, "--data-dir", str(blocked / "data"))
    assert out.returncode == 1 and "cannot create the data directory" in out.stderr, out.stderr


# ---- PostgreSQL (the store of a fleet) ------------------------------------------------------------------

@pytest.fixture
def pg():
    from postgres_harness import postgres_server

    pytest.importorskip("psycopg", reason="psycopg is not installed: make test installs it (.[postgres])")
    with postgres_server() as server:
        yield server


@pytest.mark.slow
def test_postgresql_store_survives_a_kill_and_its_own_absence(tmp_path, pg):
    store = ("--job-store", pg.url)
    with run_server(tmp_path, *ARGS, *store) as s:
        ids = submit_jobs(s.url, 3)
        wait_until(lambda: first_job_early(s.url, ids[0]), 30, "the first job to run")
        s.proc.kill()
        s.proc.wait(30)
    with run_server(tmp_path, *ARGS, *store) as s:
        check_done_as_alone(s.url, ids)
        pg.stop()  # the database goes away while the server runs
        down = httpx.post(s.url + "/jobs", json=dict(JOB, class_id=1), timeout=60)
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable", down.text
        assert httpx.post(s.url + "/generate", json=dict(JOB, class_id=1, steps=3), timeout=60).status_code == 200
        pg.start()
        back = httpx.post(s.url + "/jobs", json=dict(JOB, class_id=2, steps=3), timeout=60)
        assert back.status_code == 202
        wait_until(lambda: statuses(s.url, [back.json()["id"]]) == ["done"], 60, "a job after the store came back")


def test_an_unreachable_postgresql_stops_the_server_at_once(tmp_path, pg):
    pg.stop()
    out = _start(tmp_path, "--job-store", pg.url)
    assert out.returncode == 1 and "cannot open the job store 127.0.0.1" in out.stderr
    assert "reachable" in out.stderr and "postgres@" not in out.stderr.split("job store")[1][:10]


def test_job_places_per_key_and_deleting_an_ended_job_frees_its_place(tmp_path):
    keys = '["key-a", "key-b"]'
    with run_server(tmp_path, *ARGS, "--max-jobs-per-key", "2", env={"DIT_API_KEYS": keys}) as s:
        a, b = ({"X-API-Key": key} for key in ("key-a", "key-b"))
        short = dict(JOB, class_id=1, steps=3)
        mine = [httpx.post(s.url + "/jobs", json=short, headers=a, timeout=30).json()["id"] for _ in range(2)]
        full = httpx.post(s.url + "/jobs", json=short, headers=a, timeout=30)
        assert full.status_code == 429 and full.json()["error"]["code"] == "too_many_jobs"
        assert "DELETE /jobs/{id} of an ended job frees its place at once" in full.json()["error"]["message"]
        assert httpx.post(s.url + "/jobs", json=short, headers=b, timeout=30).status_code == 202  # b's own places
        wait_until(lambda: httpx.get(f"{s.url}/jobs/{mine[0]}", headers=a).json()["status"] == "done", 60, "done")
        deleted = httpx.delete(f"{s.url}/jobs/{mine[0]}", headers=a)
        assert deleted.status_code == 200 and deleted.json()["status"] == "done"
        assert httpx.get(f"{s.url}/jobs/{mine[0]}", headers=a).status_code == 404
        assert httpx.post(s.url + "/jobs", json=short, headers=a, timeout=30).status_code == 202  # the place is free


# ---- the store in-process (no server) -------------------------------------------------------------------

def _job(job_id: str, steps: int = 5):
    import time as clock

    from model.samplers import Sampling
    from server.engine.request import EngineRequest
    from server.service.job import Job

    now = clock.time()
    return Job(EngineRequest(job_id, 1, (7,), Sampling("ddim", steps, 1.0), now, now + 600), "fashion_dit", "Trouser")


def _store(url: str):
    from server.service.job_store import JobStore

    return JobStore(url, ttl=600, max_jobs=100, shared=True)  # shared: several stores in this one process


def test_a_job_that_was_started_too_often_fails_and_a_cancel_reaches_a_job_not_held(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = _store(url)
    for job_id in ("crash", "cancel-me", "fine"):
        first.add(_job(job_id))
    first.close()  # the process goes away with three jobs pending
    for _ in range(2):  # two more starts, each resuming the crashing job, which dies with the engine again
        store = _store(url)
        assert [j.id for j in store.claim()[0]][:1] == ["crash"]
        store.close()
    store = _store(url)
    held = store.get("cancel-me", None)
    assert held.status == "queued" and not store.holds("cancel-me")
    store.cancel(held)  # DELETE before the resume: in the store
    assert store.claim() == ([], [])  # the crash job's third start: failed; the cancelled one: not run
    assert store.get("crash", None).status == "failed" and "3 times" in store.get("crash", None).error.message
    assert store.get("cancel-me", None).status == "cancelled"
    late = _store(url)
    late.add(_job("new"))  # held by the process that made it: not claimed by another
    assert store.claim() == ([], []) and late.holds("new")
    late.close()
    store.close()


def test_an_end_is_written_once_the_store_is_back_and_is_read_from_memory_meanwhile(tmp_path, pg):
    store = _store(pg.url)
    job = _job("j1")
    store.add(job)
    pg.stop()
    job.finish([b"png bytes"])  # the end comes while the database is away
    assert store.holds("j1") and store.get("j1", None).status == "done"  # from memory
    pg.start()
    wait_until(lambda: not store.holds("j1"), 30, "the end to be written")
    assert store.get("j1", None).status == "done" and store.images(store.get("j1", None)) == [b"png bytes"]
    store.close()


@pytest.mark.slow
def test_a_job_the_restarted_server_would_refuse_fails_instead_of_running(tmp_path):
    data = ["--data-dir", str(tmp_path / "store")]
    with run_server(tmp_path, *ARGS, *data) as s:
        [job_id] = submit_jobs(s.url, 1)  # 1000 steps
        wait_until(lambda: first_job_early(s.url, job_id), 30, "the job to run")
        s.proc.kill()
        s.proc.wait(30)
    with run_server(tmp_path, "--max-steps", "500", *data) as s:  # the door's limit is lower now
        wait_until(lambda: statuses(s.url, [job_id]) == ["failed"], 30, "the job to fail")
        error = httpx.get(f"{s.url}/jobs/{job_id}").json()["error"]
        assert error["code"] == "invalid_request" and "at most 500 on this server (--max-steps)" in error["message"]


# ---- leases: front-ends that share a store, and a second server refused --------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        yield request.getfixturevalue("pg").url


def _front_end(url: str, **kw):
    from server.service.job_store import JobStore

    return JobStore(url, ttl=600, max_jobs=100, shared=True, lease=0.5, renew=0.1, **kw)


def test_a_killed_front_end_s_jobs_are_taken_over_and_cancels_and_progress_cross_front_ends(shared_url):
    from server.engine.request import ErrorKind, FinishReason, RequestError, RequestStatus

    a, b, c = _front_end(shared_url), _front_end(shared_url), _front_end(shared_url)
    claimed = []
    b.on_claim = claimed.extend
    a.add(_job("j1"))
    a.add(_job("j2"))
    wait_until(lambda: len(a._written_steps) == 2, 10, "a's first renewal")
    assert claimed == []  # a renews its leases: nothing to take
    a._closing.set()  # a is killed: its renewals stop, nothing is released
    a._keeper_thread.join()
    wait_until(lambda: len(claimed) == 2, 10, "b to claim a's jobs once their leases ran out")
    assert [j.id for j in claimed] == ["j1", "j2"] and all(j.status == "queued" for j in claimed)
    j1, j2 = claimed
    b.hold(j1)
    b.hold(j2)
    # a was not dead after all (it had lost the store): its end of j1 is not written over b's
    a._live["j1"].fail(RequestError(ErrorKind.GENERATION_FAILED, "late"))
    wait_until(lambda: not a.holds("j1"), 10, "a's writer to drop its end of j1")
    assert c.get("j1", None).status == "queued"
    # Progress written by the holder is what another front-end shows.
    j1.request.status, j1.request.step = RequestStatus.RUNNING, 3
    wait_until(lambda: c.get("j1", None).request.step == 3, 10, "j1's progress through c")
    assert c.get("j1", None).status == "running"
    # A DELETE through c reaches the holder, b, at its next renewal.
    cancelled = []
    j2.on_cancel = cancelled.append
    c.cancel(c.get("j2", None))
    wait_until(lambda: cancelled == [FinishReason.CANCELLED], 10, "b to cancel j2")
    for store in (b, c):
        store.close()


def test_a_second_server_on_a_live_server_s_store_is_refused_and_a_killed_one_s_is_not(tmp_path):
    from server.service.job_store import JobStore, StoreError

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    live = subprocess.Popen([sys.executable, "-c", "import sys, time; from server.service.job_store import JobStore; "
                             f"JobStore({url!r}, ttl=600, max_jobs=100, renew=0.2); print('open', flush=True); "
                             "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "open"
        with pytest.raises(StoreError, match="another server .* uses the job store"):
            JobStore(url, ttl=600, max_jobs=100, lease=1.0, renew=0.2)  # its heartbeat stays fresh: refused
    finally:
        live.kill()  # kill -9: its heartbeat stays in the store, fresh
        live.wait()
    JobStore(url, ttl=600, max_jobs=100).close()  # a process of this host that no longer runs: at once


def test_a_version_1_store_gains_the_lease_columns_and_its_pending_jobs_are_claimed(tmp_path):
    from sqlalchemy import Column, MetaData, Table, create_engine, insert

    from server.service import job_store

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    def columns(table, leave=()):
        return [Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable) for c in table.columns
                if c.name not in leave]

    old = MetaData()  # the tables as version 1 made them
    Table("dit_jobs", old, *columns(job_store.jobs_table, leave=job_store.ADDED_COLUMNS["dit_jobs"]))
    Table("dit_meta", old, *columns(job_store.meta_table))
    db = create_engine(url)
    with db.begin() as c:
        old.create_all(c)
        c.execute(insert(old.tables["dit_meta"]).values(key="schema", value="1"))
    db.dispose()
    writer = _store(url)  # adds the lease columns to the version-1 table
    writer.add(_job("left"))
    writer.close()
    store = _store(url)
    assert [j.id for j in store.claim()[0]] == ["left"]
    store.close()


def test_a_version_2_store_gains_the_datasets_columns(tmp_path):
    from sqlalchemy import Column, MetaData, Table, create_engine, insert, inspect

    from server.service import datasets, job_store

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    old = MetaData()  # the datasets' tables as version 2 made them
    for table in (job_store.meta_table, datasets.datasets_table, datasets.shards_table):
        leave = job_store.ADDED_COLUMNS.get(table.name, {})
        Table(table.name, old, *[Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                 for c in table.columns if c.name not in leave])
    db = create_engine(url)
    with db.begin() as c:
        old.create_all(c)
        c.execute(insert(old.tables["dit_meta"]).values(key="schema", value="2"))
    db.dispose()
    _store(url).close()
    db = create_engine(url)
    with db.begin() as c:
        for table in ("dit_datasets", "dit_shards"):
            have = {column["name"] for column in inspect(c).get_columns(table)}
            assert set(job_store.ADDED_COLUMNS[table]) <= have, (table, have)
    db.dispose()


def test_a_front_end_whose_clock_is_behind_keeps_its_jobs(pg):
    """Leases are on the database's clock: a host whose clock is 30 s behind (60 leases) writes leases that
    the others read as live, not as run out long ago (its job would run twice)."""
    import time

    behind = _front_end(pg.url, clock=lambda: time.time() - 30)
    other = _front_end(pg.url)
    behind.add(_job("mine"))
    wait_until(lambda: len(behind._written_steps) == 1, 10, "its first renewal")
    assert other.claim() == ([], []) and behind.holds("mine")
    assert abs(behind.now() - other.now()) < 1.0
    behind.close()
    other.close()
