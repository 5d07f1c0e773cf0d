"""Dataset jobs: thousands of images per class, written as shards (WebDataset tars or the `.npz` the ADM
evaluation suite reads), resumable, at a lower priority than interactive work.

A dataset is `per_class` images of each of its classes, in class order; image k of class c has the seed
`seed + c * CLASS_STRIDE + k` (`image_seed`), so any image can be made again alone with
`POST /generate {"class_id": c, "seed": ...}` with the dataset's sampling settings. Images are cut into
shards of `shard_size`; each shard is generated as chunks of at most CHUNK images, each chunk one engine
request marked `background` (server/engine/scheduler.py: its samples join only while no interactive
request waits). A shard is written once its chunks are done: to a temporary file, then renamed, then
recorded in the store (`dit_shards`, with its size and SHA-256): a finished shard is never made again.
The dataset's row (`dit_datasets`) holds its spec, status and the front-end that runs it; after a
restart, a dataset whose front-end is gone (no fresh heartbeat in `dit_frontends`) is taken up by the
next front-end, which makes only the shards not yet recorded. Shard files live under
`--data-dir/datasets/<id>/`: a dataset is run, and its shards served, by the front-end whose disk holds
them. Ended datasets and their files are deleted `--dataset-ttl` after their end.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import Column, Float, Integer, String, Table, Text, delete, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from model.samplers import Sampling

from ..engine.request import EngineRequest, ErrorKind, RequestError
from .job import Job
from .job_store import frontends_table, metadata
from .listeners import Listeners

log = logging.getLogger(__name__)

CLASS_STRIDE = 1_000_000  # seeds of consecutive classes are this far apart: per_class is at most this
CHUNK = 16  # images per engine request: small enough to share the batch, large enough to fill it
CHUNK_TRIES = 3  # a chunk whose engine died with it this many times fails the dataset
CHUNK_DEADLINE = 24 * 3600.0  # seconds: a background chunk may wait long behind interactive work
LOOP_SECONDS = 1.0  # how often the runner checks for datasets to take up and files to expire
FORMATS = ("webdataset", "npz")
ADM_FILE = "adm.npz"  # evaluate: true for a model the judge does not know: every image, for the ADM suite
# The ADM suite's ImageNet reference batches, by image size (openai/guided-diffusion, evaluations/README.md)
ADM_REFERENCE = {64: "VIRTUAL_imagenet64_labeled.npz", 128: "VIRTUAL_imagenet128_labeled.npz",
                 256: "VIRTUAL_imagenet256_labeled.npz", 512: "VIRTUAL_imagenet512.npz"}

datasets_table = Table(
    "dit_datasets", metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),  # the API key's hash; "" without keys
    Column("spec", Text, nullable=False),  # JSON: classes, per_class, sampling, seed, format, shard_size, tag
    Column("status", String(16), nullable=False),  # running, done, failed, cancelled
    Column("error", Text),
    Column("holder", String(128)),  # the front-end running it (its heartbeat is in dit_frontends)
    Column("images_done", Integer, nullable=False, default=0),
    Column("created", Float, nullable=False),
    Column("ended", Float),
    Column("webhook_url", String(2048)),  # POSTed the status JSON when it ends (server/http/webhooks.py)
    Column("webhook_state", String(16)),  # pending, delivered or undelivered (none without a webhook)
    Column("evaluation", Text),  # JSON: what evaluate: true gave (the judge's figures, or the ADM suite's .npz)
)
shards_table = Table(
    "dit_shards", metadata,
    Column("dataset_id", String(64), primary_key=True), Column("k", Integer, primary_key=True),
    Column("images", Integer, nullable=False), Column("bytes", Integer, nullable=False),
    Column("sha256", String(64), nullable=False), Column("file", String(256), nullable=False),
    Column("ended", Float, nullable=False),
    Column("replicas", Text),  # JSON: the engine replicas that made its images (on a Ray fleet)
)


def image_seed(seed: int, class_id: int, k: int) -> int:
    """The seed of image k of class c in a dataset with base `seed`."""
    return seed + class_id * CLASS_STRIDE + k


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is, validated at the door; stored as JSON."""

    classes: tuple[int, ...]
    per_class: int
    sampling: Sampling
    seed: int
    format: str  # webdataset or npz
    shard_size: int
    model: str
    class_names: tuple[str, ...]  # of `classes`, for the images' metadata
    tag: str | None = None
    # Once all images are made: "judge" (the embedded Fashion-MNIST model): the project's judge's figures;
    # "adm" (any other model): every image in the one .npz the ADM evaluation suite reads; None: nothing.
    evaluate: str | None = None

    @property
    def total(self) -> int:
        return len(self.classes) * self.per_class

    @property
    def shards(self) -> int:
        return math.ceil(self.total / self.shard_size)

    def item(self, i: int) -> tuple[int, int]:
        """(class id, k) of the dataset's i-th image."""
        return self.classes[i // self.per_class], i % self.per_class

    def shard_items(self, k: int) -> range:
        return range(k * self.shard_size, min(self.total, (k + 1) * self.shard_size))

    def to_json(self) -> str:
        s = self.sampling
        return json.dumps({"classes": list(self.classes), "per_class": self.per_class, "seed": self.seed,
                           "format": self.format, "shard_size": self.shard_size, "model": self.model,
                           "class_names": list(self.class_names), "tag": self.tag, "evaluate": self.evaluate,
                           "sampling": {"sampler": s.sampler, "steps": s.steps, "cfg_scale": s.cfg_scale,
                                        "guidance_interval": list(s.guidance_interval),
                                        "cache": s.cache.describe()}})

    @classmethod
    def from_json(cls, text: str) -> DatasetSpec:
        d = json.loads(text)
        s = d["sampling"]
        sampling = Sampling(s["sampler"], s["steps"], s["cfg_scale"], tuple(s["guidance_interval"]), s["cache"])
        return cls(tuple(d["classes"]), d["per_class"], sampling, d["seed"], d["format"], d["shard_size"],
                   d["model"], tuple(d["class_names"]), d["tag"], d.get("evaluate"))

    def describe(self) -> dict:
        return json.loads(self.to_json())


@dataclass(eq=False)
class Dataset:
    """A dataset as this process knows it: its row, and while it runs here, its shards in the making."""

    id: str
    owner: str
    spec: DatasetSpec
    status: str
    created: float
    ended: float | None = None
    error: str | None = None
    images_done: int = 0  # in written shards
    shards_done: set[int] = field(default_factory=set)
    webhook_url: str | None = None
    webhook_state: str | None = None
    evaluation: dict | None = None
    started: float = field(default_factory=time.time)  # when this process took it up (images/s since)
    done_at_start: int = 0
    images_made: int = 0  # generated by this process, shards in the making included
    # shard k -> {chunk start index -> encoded PNGs}, for the shards being made
    pending: dict[int, dict[int, list[bytes]]] = field(default_factory=dict)
    made_by: dict[int, set[str]] = field(default_factory=dict)  # shard k -> the engine replicas of its chunks
    next_item: int = 0  # the next image (dataset index) not yet given to the engine
    listeners: Listeners = field(default_factory=Listeners, repr=False)  # SSE streams of its progress

    def status_json(self) -> dict:
        spec, running, elapsed = self.spec, self.status == "running", max(1e-9, time.time() - self.started)
        made = self.done_at_start + self.images_made if running else self.images_done
        rate = self.images_made / elapsed if running else None
        left = spec.total - made
        out = {"id": self.id, "status": self.status, "images_done": self.images_done, "images_total": spec.total,
               "images_generated": made, "shards_done": len(self.shards_done), "shards_total": spec.shards,
               "images_per_second": round(rate, 3) if rate else rate,
               "eta_seconds": round(left / rate, 1) if rate else None,
               "created": self.created, "ended": self.ended, "error": self.error, **spec.describe(),
               "status_url": f"/datasets/{self.id}", "manifest_url": f"/datasets/{self.id}/manifest"}
        if self.webhook_url is not None:
            out.update(webhook_url=self.webhook_url, webhook_state=self.webhook_state)
        if spec.evaluate:
            out["evaluation"] = self.evaluation  # None until the images are judged
        return out


class DatasetFull(Exception):
    """A limit on datasets (in flight per key) is reached."""


class Datasets:
    """The datasets of this front-end: made, run, taken up after a restart, served, expired."""

    def __init__(self, service, db, holder: str, data_dir: Path, *, ttl: float, max_bytes: int,
                 max_per_key: int, lease: float, judge_data: Path | None = None):
        self.service, self.db, self.holder = service, db, holder
        self.root = Path(data_dir) / "datasets"
        self.ttl, self.max_bytes, self.max_per_key, self.lease = ttl, max_bytes, max_per_key, lease
        self.judge_data = judge_data  # Fashion-MNIST's test set, for evaluate: true
        # Called (on a dataset thread) when a dataset with a webhook_url has ended: the HTTP side delivers it.
        self.on_end: Callable[[Dataset], None] | None = None
        self._running: dict[str, Dataset] = {}  # run here, in creation order
        self._chunks: dict[str, tuple[Dataset, int, int, int]] = {}  # job id -> (dataset, shard, start, tries)
        self._lock = threading.Lock()
        self._creating = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Shards are assembled and written off the encoders' threads (interactive answers use those).
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="dataset-shards")
        self._evaluator = ThreadPoolExecutor(1, thread_name_prefix="dataset-evaluation")

    # ---- the API --------------------------------------------------------------------------------------
    def create(self, spec: DatasetSpec, owner: str | None, webhook_url: str | None = None) -> Dataset:
        dataset = Dataset(secrets.token_urlsafe(12), owner or "", spec, "running", time.time(), webhook_url=webhook_url)
        # One front-end runs datasets (a shared store refuses them), so a lock here makes the count and the
        # insert one step: two requests at once cannot both pass --max-datasets-per-key.
        with self._creating, self.db.begin() as c:
            mine = c.execute(select(func.count()).select_from(datasets_table).where(
                datasets_table.c.owner == dataset.owner, datasets_table.c.status == "running")).scalar()
            if mine >= self.max_per_key:
                raise DatasetFull(f"{mine} datasets of this API key are running (--max-datasets-per-key)")
            c.execute(insert(datasets_table).values(id=dataset.id, owner=dataset.owner, spec=spec.to_json(),
                                                    status="running", holder=self.holder, created=dataset.created,
                                                    webhook_url=webhook_url))
        self._take(dataset)
        return dataset

    def get(self, dataset_id: str, owner: str | None) -> Dataset | None:
        running = self._running.get(dataset_id)
        if running is not None:
            return running if running.owner == (owner or "") else None
        with self.db.begin() as c:
            row = c.execute(select(datasets_table).where(datasets_table.c.id == dataset_id,
                                                         datasets_table.c.owner == (owner or ""))).mappings().first()
            shards = c.execute(select(shards_table.c.k).where(shards_table.c.dataset_id == dataset_id)).scalars()
            return None if row is None else _from_row(row, set(shards))

    def of(self, owner: str | None, limit: int) -> list[Dataset]:
        with self.db.begin() as c:
            rows = c.execute(select(datasets_table).where(datasets_table.c.owner == (owner or ""))
                             .order_by(datasets_table.c.created.desc()).limit(limit)).mappings().all()
            ids = [row["id"] for row in rows]
            done = c.execute(select(shards_table.c.dataset_id, shards_table.c.k)
                             .where(shards_table.c.dataset_id.in_(ids))).all()
        return [self._running.get(row["id"]) or _from_row(row, {k for d, k in done if d == row["id"]})
                for row in rows]

    def runs(self, dataset: Dataset) -> bool:
        """Whether this process runs the dataset (its object then changes as it runs)."""
        return self._running.get(dataset.id) is dataset

    def manifest(self, dataset: Dataset) -> list[dict]:
        with self.db.begin() as c:
            rows = c.execute(select(shards_table).where(shards_table.c.dataset_id == dataset.id)
                             .order_by(shards_table.c.k)).mappings().all()
        return [{"shard": r["k"], "file": r["file"], "images": r["images"], "bytes": r["bytes"],
                 "sha256": r["sha256"], "url": f"/datasets/{dataset.id}/shards/{r['k']}",
                 "replicas": json.loads(r["replicas"] or "[]")} for r in rows]

    def shard_file(self, dataset: Dataset, k: int) -> Path | None:
        """The finished shard's file, if this front-end holds it."""
        with self.db.begin() as c:
            name = c.execute(select(shards_table.c.file).where(shards_table.c.dataset_id == dataset.id,
                                                               shards_table.c.k == k)).scalar()
        path = self.root / dataset.id / name if name else None
        return path if path is not None and path.exists() else None

    def cancel(self, dataset: Dataset) -> None:
        """Stop a running dataset: its chunks leave the engine, its finished shards stay until expiry."""
        self._end(dataset, "cancelled", None)
        self._cancel_chunks(lambda d: d is dataset)

    def remove(self, dataset: Dataset) -> None:
        """Delete an ended dataset: its rows and its files."""
        self._delete(dataset.id)

    def _delete(self, dataset_id: str) -> None:
        with self.db.begin() as c:
            c.execute(delete(shards_table).where(shards_table.c.dataset_id == dataset_id))
            c.execute(delete(datasets_table).where(datasets_table.c.id == dataset_id))
        shutil.rmtree(self.root / dataset_id, ignore_errors=True)

    def _cancel_chunks(self, which) -> None:
        """The chunks in the engine of the datasets `which` selects leave it at its next step."""
        with self._lock:
            chunks = [job_id for job_id, (d, *_) in self._chunks.items() if which(d)]
        for job_id in chunks:
            job = self.service.job(job_id)
            if job is not None:
                job.cancel()

    # ---- running ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Once the engine is ready: take up datasets no live front-end runs, and feed the engine."""
        self._thread = threading.Thread(target=self._loop, name="datasets", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Shutdown: no more chunks, and those in the engine leave it (a shard is made whole or not at
        all); the datasets stay running in the store, for the next start."""
        self._stopping = True
        self._wake.set()
        self._cancel_chunks(lambda d: True)
        try:
            with self.db.begin() as c:
                c.execute(update(datasets_table).where(datasets_table.c.holder == self.holder).values(holder=None))
        except SQLAlchemyError as e:
            log.warning("could not release this front-end's datasets: %s", e)

    def _loop(self) -> None:
        last_check = 0.0
        while not self._stopping:
            if time.monotonic() - last_check >= LOOP_SECONDS:
                last_check = time.monotonic()
                try:
                    self._take_up()
                    self._expire()
                except SQLAlchemyError as e:
                    log.warning("datasets: the store is unavailable (%s); trying again", e)
            try:
                self._feed()
            except Exception:
                log.exception("datasets: feeding the engine failed")
            self._wake.wait(LOOP_SECONDS)
            self._wake.clear()

    def _take_up(self) -> None:
        """Datasets whose front-end is gone (stopped, or killed: no fresh heartbeat) come here: running ones
        run here, ended ones whose webhook was not delivered are delivered from here."""
        if not self.service.can_resume:
            return
        now = self.service.jobs.now()  # heartbeats are on the store's clock
        live = select(frontends_table.c.holder).where(frontends_table.c.heartbeat > now - self.lease)
        with self.db.begin() as c:
            orphan = ((datasets_table.c.status == "running") | (datasets_table.c.webhook_state == "pending")) & (
                datasets_table.c.holder.is_(None) | datasets_table.c.holder.not_in(live))
            ids = c.execute(select(datasets_table.c.id).where(orphan)).scalars().all()
            if not ids:
                return
            c.execute(update(datasets_table).where(datasets_table.c.id.in_(ids), orphan).values(holder=self.holder))
            rows = c.execute(select(datasets_table).where(datasets_table.c.id.in_(ids),
                                                          datasets_table.c.holder == self.holder)).mappings().all()
            done = c.execute(select(shards_table.c.dataset_id, shards_table.c.k).where(
                shards_table.c.dataset_id.in_(ids))).all()
        for row in sorted(rows, key=lambda r: r["created"]):
            dataset = _from_row(row, {k for d, k in done if d == row["id"]})
            if dataset.status != "running":
                log.info("dataset %s ended %s; delivering its webhook", dataset.id, dataset.status)
                self._announce(dataset)
                continue
            log.info("dataset %s taken up: %d of %d shards were done", dataset.id, len(dataset.shards_done),
                     dataset.spec.shards)
            self._take(dataset)

    def _take(self, dataset: Dataset) -> None:
        dataset.done_at_start, dataset.started = dataset.images_done, time.time()
        with self._lock:
            self._running[dataset.id] = dataset
        if len(dataset.shards_done) == dataset.spec.shards:  # stopped during its evaluation: that is left
            self._evaluator.submit(self._finish, dataset)
        self._wake.set()

    def _in_flight_limit(self) -> int:
        """Chunks in the engine at once: enough to fill the row budget when nothing else runs."""
        return max(2, math.ceil(self.service.settings.max_batch_rows / CHUNK) + 1)

    def _feed(self) -> None:
        """Give the engine the next chunks, round-robin across the running datasets."""
        while not self._stopping and self.service.can_resume:
            with self._lock:
                if len(self._chunks) >= self._in_flight_limit():
                    return
                ready = [d for d in self._running.values() if d.status == "running" and self._next_chunk(d)]
            if not ready:
                return
            for dataset in ready:
                chunk = self._next_chunk(dataset)
                if chunk is not None:
                    shard, start, stop = chunk
                    dataset.next_item = stop
                    self._submit(dataset, shard, start, stop, tries=1)

    def _next_chunk(self, d: Dataset) -> tuple[int, int, int] | None:
        """(shard, first item, end) of the dataset's next chunk, skipping finished shards."""
        spec = d.spec
        while d.next_item < spec.total:
            shard = d.next_item // spec.shard_size
            if shard in d.shards_done:
                d.next_item = spec.shard_items(shard).stop
                continue
            end = min(d.next_item + CHUNK, spec.shard_items(shard).stop)
            # a chunk holds one class (one engine request has one class)
            c0, _ = spec.item(d.next_item)
            while spec.item(end - 1)[0] != c0:
                end -= 1
            return shard, d.next_item, end
        return None

    def _submit(self, d: Dataset, shard: int, start: int, stop: int, tries: int) -> None:
        spec = d.spec
        class_id, k0 = spec.item(start)
        now = time.time()
        request = EngineRequest(f"{d.id}.{start}.{tries}", class_id,
                                tuple(image_seed(spec.seed, class_id, k0 + i) for i in range(stop - start)),
                                spec.sampling, now, now + CHUNK_DEADLINE, d.owner or None, background=True,
                                affinity=f"{d.id}/{shard}")
        name = spec.class_names[spec.classes.index(class_id)]
        job = Job(request, spec.model, name, format="png", separate=True)
        with self._lock:
            self._chunks[job.id] = (d, shard, start, tries)
            d.pending.setdefault(shard, {})
        job.done.add_done_callback(lambda _: self._chunk_ended(job))
        try:
            self.service.enter(job)
        except RequestError as e:
            job.fail(e)

    def _chunk_ended(self, job: Job) -> None:
        with self._lock:
            d, shard, start, tries = self._chunks.pop(job.id)
        self._wake.set()
        if d.status != "running" or self._stopping:  # a stop: the dataset goes on at the next start
            return
        if job.error is not None:
            retry = job.error.kind in (ErrorKind.ENGINE_DIED, ErrorKind.NOT_READY, ErrorKind.DEADLINE_EXCEEDED)
            if retry and tries < CHUNK_TRIES:
                if self.service.can_resume:
                    self._submit(d, shard, start, start + job.request.num_images, tries + 1)
                else:  # stopping: made again at the next start, with the rest of its shard
                    pass
                return
            self._end(d, "failed", f"a chunk of shard {shard} failed: {job.error.message}")
            return
        self.service.metrics.dataset_images.inc(len(job.images))
        with self._lock:
            d.images_made += len(job.images)
            pending = d.pending[shard]
            pending[start] = job.images
            if job.replica is not None:
                d.made_by.setdefault(shard, set()).add(job.replica)
            complete = sum(len(v) for v in pending.values()) == len(d.spec.shard_items(shard))
            if complete:
                images = [png for s in sorted(pending) for png in pending[s]]
                del d.pending[shard]
        d.listeners.changed()
        if complete:
            self._writer.submit(self._write_shard, d, shard, images)

    def _write_shard(self, d: Dataset, shard: int, images: list[bytes]) -> None:
        spec, items = d.spec, d.spec.shard_items(shard)
        folder = self.root / d.id
        name = f"shard-{shard:05d}.{'tar' if spec.format == 'webdataset' else 'npz'}"
        tmp = folder / (name + ".part")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            data = _shard_bytes(spec, items, images)
            self._make_room(len(data), d.id)
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)
        except (OSError, DatasetFull) as e:
            tmp.unlink(missing_ok=True)  # what a full disk let through: a part of a shard is no shard
            self._end(d, "failed", f"writing shard {shard} failed ({e}); the finished shards stay: free disk "
                      "space or raise --max-dataset-bytes, then make the dataset again")
            return
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            d.shards_done.add(shard)
            d.images_done += len(items)
            finished = len(d.shards_done) == spec.shards
            replicas = sorted(d.made_by.pop(shard, ()))
        d.listeners.changed()
        try:
            with self.db.begin() as c:
                c.execute(insert(shards_table).values(dataset_id=d.id, k=shard, images=len(items), bytes=len(data),
                                                      sha256=digest, file=name, ended=time.time(),
                                                      replicas=json.dumps(replicas)))
                c.execute(update(datasets_table).where(datasets_table.c.id == d.id)
                          .values(images_done=d.images_done))
        except SQLAlchemyError as e:
            log.error("dataset %s: shard %d written but not recorded (%s); it is made again after a restart",
                      d.id, shard, e)
        if finished:
            self._evaluator.submit(self._finish, d)

    def _finish(self, d: Dataset) -> None:
        """Every shard is written: the evaluation asked for (on a thread of its own: it may take minutes, and
        other datasets' shards are written meanwhile), then the end."""
        if d.spec.evaluate == "judge":
            d.evaluation = self._judge(d)
        elif d.spec.evaluate == "adm":
            d.evaluation = self._adm_npz(d)
        self._end(d, "done", None)

    def _judge(self, d: Dataset) -> dict:
        """Class agreement and feature-FID of the dataset's images by the project's judge (training/judge.py:
        its classifier ships in weights/), against as many Fashion-MNIST test images; or what kept it from it."""
        started = time.monotonic()
        try:
            import torch

            from training.judge import judge, read_shards

            images, labels = read_shards(sorted((self.root / d.id).glob("shard-*")))
            result = judge(torch.from_numpy(images), torch.from_numpy(labels), data_dir=self.judge_data)
        except Exception as e:  # the test set missing (FileNotFoundError) or unreadable, a shard unreadable...
            log.exception("dataset %s: the evaluation failed", d.id)
            return {"error": f"the evaluation failed ({type(e).__name__}: {e}); the shards are made: run dit-eval "
                    "on them (the judge needs Fashion-MNIST's test set: the server's --judge-data)"}
        log.info("dataset %s judged in %.1f s: %s", d.id, time.monotonic() - started, result)
        return {**result, "judge": "weights/fashion_classifier.safetensors",
                "reference": "Fashion-MNIST test set, as many images as the dataset"}

    def _make_room(self, size: int, keep: str) -> None:
        """Keep the datasets' files within --max-dataset-bytes: delete ended datasets, oldest first."""
        used = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
        if used + size <= self.max_bytes:
            return
        with self.db.begin() as c:
            ended = c.execute(select(datasets_table.c.id).where(datasets_table.c.status != "running",
                                                                datasets_table.c.id != keep)
                              .order_by(datasets_table.c.ended)).scalars().all()
        for dataset_id in ended:
            folder = self.root / dataset_id
            used -= sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0
            self._delete(dataset_id)
            if used + size <= self.max_bytes:
                return
        raise DatasetFull(f"the datasets' files would exceed --max-dataset-bytes ({self.max_bytes} bytes)")

    def _adm_npz(self, d: Dataset) -> dict:
        """Every image of the dataset in the one .npz the ADM evaluation suite reads (training/judge.py's
        write_adm_npz: shard by shard), served at /datasets/{id}/adm.npz; or what kept it from it."""
        from training.judge import read_shard, write_adm_npz

        shards = sorted((self.root / d.id).glob("shard-*"))
        path = self.root / d.id / ADM_FILE
        try:
            first, _ = read_shard(shards[0])
            shape = (d.spec.total, *first.shape[1:])
            self._make_room(math.prod(shape) + 8 * d.spec.total, d.id)
            write_adm_npz(shards, path.with_suffix(".part"))
            os.replace(path.with_suffix(".part"), path)
        except Exception as e:  # a full disk, --max-dataset-bytes, an unreadable shard...
            path.with_suffix(".part").unlink(missing_ok=True)
            log.exception("dataset %s: the ADM .npz could not be written", d.id)
            return {"error": f"the ADM suite's .npz could not be written ({e}); download the shards and run "
                    "dit-eval --merge on them"}
        return {"adm_npz": f"/datasets/{d.id}/{ADM_FILE}", "images": shape[0], "bytes": path.stat().st_size,
                "command": f"python evaluator.py {ADM_REFERENCE.get(shape[1], 'REFERENCE_BATCH.npz')} {ADM_FILE}",
                "suite": "github.com/openai/guided-diffusion, evaluations/ (its README links the reference "
                         "batches)"}

    def adm_file(self, d: Dataset) -> Path | None:
        path = self.root / d.id / ADM_FILE
        return path if path.exists() else None

    def _end(self, d: Dataset, status: str, error: str | None) -> None:
        with self._lock:
            if d.status != "running":
                return
            d.status, d.error, d.ended = status, error, time.time()
            d.webhook_state = "pending" if d.webhook_url is not None else None
            self._running.pop(d.id, None)
        (log.info if status == "done" else log.warning)("dataset %s %s%s", d.id, status, f": {error}" if error else "")
        try:
            with self.db.begin() as c:
                running = (datasets_table.c.id == d.id) & (datasets_table.c.status == "running")
                c.execute(update(datasets_table).where(running).values(
                    status=status, error=error, ended=d.ended, images_done=d.images_done, webhook_state=d.webhook_state,
                    evaluation=None if d.evaluation is None else json.dumps(d.evaluation)))
        except SQLAlchemyError as e:
            log.error("dataset %s: its end could not be written (%s)", d.id, e)
        d.listeners.changed()
        self._announce(d)

    def _announce(self, d: Dataset) -> None:
        """An ended dataset's webhook, where it has one still to deliver."""
        if d.webhook_state == "pending" and self.on_end is not None:
            self.on_end(d)

    def delivered(self, dataset_id: str, ok: bool) -> None:
        """The webhook's outcome (from the HTTP side's deliveries)."""
        with self.db.begin() as c:
            c.execute(update(datasets_table).where(datasets_table.c.id == dataset_id)
                      .values(webhook_state="delivered" if ok else "undelivered"))

    def _expire(self) -> None:
        with self.db.begin() as c:
            old = c.execute(select(datasets_table.c.id).where(datasets_table.c.ended < time.time() - self.ttl)
                            ).scalars().all()
        for dataset_id in old:
            self._delete(dataset_id)


def _key(spec: DatasetSpec, i: int) -> str:
    class_id, k = spec.item(i)
    return f"c{class_id:04d}_{k:06d}"


def _shard_bytes(spec: DatasetSpec, items: range, images: list[bytes]) -> bytes:
    """A WebDataset tar ({key}.png + {key}.json per image) or an npz (arr_0 uint8 (N, H, W, 3), arr_1 labels)."""
    out = io.BytesIO()
    if spec.format == "npz":
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in images])
        labels = np.array([spec.item(i)[0] for i in items], dtype=np.int64)
        np.savez(out, arr_0=pixels, arr_1=labels)
        return out.getvalue()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, png in zip(items, images, strict=True):
            class_id, k = spec.item(i)
            meta = json.dumps({"class_id": class_id, "class_name": spec.class_names[spec.classes.index(class_id)],
                               "seed": image_seed(spec.seed, class_id, k), "k": k}).encode()
            for suffix, data in (("png", png), ("json", meta)):
                info = tarfile.TarInfo(f"{_key(spec, i)}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _from_row(row, shards_done: set[int]) -> Dataset:
    return Dataset(row["id"], row["owner"], DatasetSpec.from_json(row["spec"]), row["status"], row["created"],
                   row["ended"], row["error"], row["images_done"], shards_done, row["webhook_url"],
                   row["webhook_state"], None if row["evaluation"] is None else json.loads(row["evaluation"]))
