"""Dataset jobs: many images per class as shards (server/service/datasets.py).

    POST /datasets                 {classes, per_class, sampling settings, seed, format, shard_size,
                                   webhook_url, evaluate} -> 202
    GET /datasets                  the caller's datasets, newest first
    GET /datasets/{id}             status, images done / total, images/s, ETA, shards done; with
                                   Accept: text/event-stream, `progress` events as it changes, then
                                   `result` (the manifest) or `error`
    GET /datasets/{id}/manifest    the finished shards: file, images, bytes, SHA-256, URL
    GET /datasets/{id}/shards/{k}  a finished shard (while the others are made)
    GET /datasets/{id}/adm.npz     evaluate: true, a model the judge does not know: every image, one .npz
    DELETE /datasets/{id}          cancel a running dataset (its finished shards stay until expiry);
                                   delete an ended one with its files (404 afterwards)

A dataset belongs to the API key that made it, like a job. Its samples are a lower priority than
interactive requests: they fill the rows those leave.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from ...engine.request import ErrorKind, RequestError
from ...service.datasets import CLASS_STRIDE, Dataset, DatasetFull, DatasetSpec
from ...service.requests import InvalidSettings, default_cache, resolve_class
from .. import answers
from ..door import AnyService, not_ready, owner
from ..errors import ApiError, error_responses
from ..schemas import DatasetRequest

router = APIRouter(prefix="/datasets", tags=["datasets"])
MEDIA = {"webdataset": "application/x-tar", "npz": "application/octet-stream"}
KEEPALIVE_SECONDS = 15.0  # a comment line this often keeps proxies from closing a quiet stream


def spec_of(svc, body: DatasetRequest) -> DatasetSpec:
    """The dataset's spec, with the model's defaults and this server's limits; InvalidSettings lists what
    is wrong, each problem naming its field."""
    info, settings = svc.model.info, svc.settings
    problems: list[tuple[str | None, str]] = []
    classes: list[int] = []
    if body.classes == "all":
        classes = list(range(len(info.class_names)))
    else:
        for c in body.classes:
            try:
                label = resolve_class(info, c if isinstance(c, int) else None, c if isinstance(c, str) else None)
            except InvalidSettings as e:
                problems += [("classes", f"{c!r}: {message}") for _, message in e.problems]
                continue
            if label in classes:
                problems.append(("classes", f"{c!r} names class {label}, which the list already has"))
            classes.append(label)
    total = len(classes) * body.per_class
    if total > settings.max_dataset_images:
        problems.append(("per_class", f"{len(classes)} classes x {body.per_class} = {total} images, above this "
                         f"server's --max-dataset-images ({settings.max_dataset_images})"))
    if body.steps is not None and body.steps > settings.max_steps:
        problems.append(("steps", f"steps must be at most {settings.max_steps} (--max-steps)"))
    try:
        sampling = info.defaults.resolve(sampler=body.sampler, steps=body.steps, cfg_scale=body.cfg_scale,
                                         guidance_interval=body.guidance_interval, max_steps=settings.max_steps,
                                         cache=default_cache(info, settings) if body.cache is None else body.cache)
    except Exception as e:  # a SettingError naming its field
        problems.append((getattr(e, "field", None), str(e)))
        sampling = None
    evaluate = None
    if body.evaluate:
        evaluate = "judge" if _judged(info) else "adm"
        if evaluate == "judge" and not settings.judge_data.is_dir():
            problems.append(("evaluate", f"the Fashion-MNIST test set is not at {settings.judge_data} on this "
                             "server: its operator can install it (apt-get install dataset-fashion-mnist) or give "
                             "--judge-data"))
    if problems:
        raise ApiError.invalid(problems)
    seed = body.seed if body.seed is not None else random.randrange(2**52 - CLASS_STRIDE * len(info.class_names))
    return DatasetSpec(tuple(classes), body.per_class, sampling, seed, body.format, body.shard_size, info.name,
                       tuple(info.class_names[c] for c in classes), body.tag, evaluate)


def _judged(info) -> bool:
    """Whether the project's judge (a Fashion-MNIST classifier) knows this model's images: the embedded one."""
    from training.data import CLASS_NAMES

    return (info.space, info.image_size, list(info.class_names)) == ("pixel", 28, CLASS_NAMES)


async def _stored(fn, *args):
    try:
        return await asyncio.to_thread(fn, *args)
    except SQLAlchemyError as e:
        raise ApiError.of(RequestError(ErrorKind.NOT_READY, f"the job store is unavailable ({e}); try again "
                                       "shortly")) from e


async def _find(svc, dataset_id: str, request: Request) -> Dataset:
    dataset = await _stored(svc.datasets.get, dataset_id, owner(request))
    if dataset is None:
        raise ApiError(404, "unknown_dataset", f"no dataset {dataset_id!r}: never made (with this API key), deleted, "
                       "or expired", "id")
    return dataset


@router.post("", status_code=202, responses=error_responses(401, 422, 429, 501, 503),
             summary="make a dataset: per_class images of each class, written as shards")
async def create(body: DatasetRequest, request: Request, svc: AnyService):
    if not svc.ready:
        raise not_ready(svc)
    if svc.jobs.shared:
        raise ApiError(501, "datasets_unavailable", "datasets are made by one front-end, whose disk holds the "
                       "shards: this fleet runs several (frontend_replicas > 1); run one for datasets")
    spec = spec_of(svc, body)
    url = request.app.state.webhooks.check(body.webhook_url) if body.webhook_url is not None else None
    try:
        dataset = await _stored(svc.datasets.create, spec, owner(request), url)
    except DatasetFull as e:
        raise ApiError(429, "too_many_datasets", f"{e}: wait for one to end, or DELETE one", retry_after=60) from e
    return JSONResponse(dataset.status_json(), status_code=202, headers={"Location": f"/datasets/{dataset.id}"})


@router.get("", responses=error_responses(401, 422, 503), summary="the caller's datasets, newest first")
async def listing(request: Request, svc: AnyService, limit: int = Query(50, ge=1, le=100)):
    return {"datasets": [d.status_json() for d in await _stored(svc.datasets.of, owner(request), limit)]}


@router.get("/{dataset_id}", responses={200: {"content": {"application/json": {}, "text/event-stream": {}}},
                                        **error_responses(401, 404, 503)},
            summary="a dataset's status and progress (with Accept: text/event-stream, as events)")
async def get_status(dataset_id: str, request: Request, svc: AnyService):
    dataset = await _find(svc, dataset_id, request)
    if answers.wants_stream(request.headers.get("accept", "")):
        return StreamingResponse(_events(svc, dataset_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return dataset.status_json()


async def _events(svc, dataset_id: str, request: Request) -> AsyncIterator[str]:
    """`progress` (the status) whenever images or shards are made, then `result` (the manifest) once done,
    or `error` (failed, cancelled, deleted). Woken by the dataset's changes; a dataset this process does
    not run yet (a restart, before it is taken up) is looked up again each second."""
    last = None
    while True:
        dataset = await _stored(svc.datasets.get, dataset_id, owner(request))
        if dataset is None:
            yield answers.event("error", ApiError(404, "unknown_dataset", f"dataset {dataset_id} was deleted").body())
            return
        changed = dataset.listeners.listen()
        try:
            while dataset.status == "running":
                changed.clear()  # before reading: a change after this wakes the next wait
                now = dataset.status_json()
                seen = (now["images_generated"], now["shards_done"])
                if seen != last:
                    last = seen
                    yield answers.event("progress", now)
                if not svc.datasets.runs(dataset):
                    break
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            dataset.listeners.unlisten(changed)
        if dataset.status != "running":
            break
        await asyncio.sleep(1.0)
    final = dataset.status_json()
    yield answers.event("progress", final)
    if dataset.status == "done":
        yield answers.event("result", {**final, "shards": await _stored(svc.datasets.manifest, dataset)})
    else:
        why = dataset.error or f"the dataset was {dataset.status}"
        code = 409 if dataset.status == "cancelled" else 500
        yield answers.event("error", ApiError(code, f"dataset_{dataset.status}", why).body())


@router.get("/{dataset_id}/manifest", responses=error_responses(401, 404, 503),
            summary="the finished shards: file, images, bytes, SHA-256")
async def manifest(dataset_id: str, request: Request, svc: AnyService):
    dataset = await _find(svc, dataset_id, request)
    return {**dataset.status_json(), "shards": await _stored(svc.datasets.manifest, dataset)}


@router.get("/{dataset_id}/shards/{k}", response_class=FileResponse, responses=error_responses(401, 404, 409, 503),
            summary="a finished shard")
async def shard(dataset_id: str, k: int, request: Request, svc: AnyService):
    dataset = await _find(svc, dataset_id, request)
    if not 0 <= k < dataset.spec.shards:
        raise ApiError(404, "unknown_shard", f"dataset {dataset_id} has shards 0 to {dataset.spec.shards - 1}", "k")
    path = await _stored(svc.datasets.shard_file, dataset, k)
    if path is None:
        if k in dataset.shards_done:
            raise ApiError(404, "unknown_shard", f"shard {k} of dataset {dataset_id} was made by another front-end, "
                           "whose disk holds it", "k")
        raise ApiError(409, "not_finished", f"shard {k} of dataset {dataset_id} is not finished yet "
                       f"({len(dataset.shards_done)} of {dataset.spec.shards} are); see its manifest", retry_after=5)
    media = MEDIA[dataset.spec.format]
    return FileResponse(path, media_type=media, filename=path.name)


@router.get("/{dataset_id}/adm.npz", response_class=FileResponse, responses=error_responses(401, 404, 409, 503),
            summary="every image in the one .npz the ADM evaluation suite reads (evaluate: true, models the judge "
                    "does not know)")
async def adm_npz(dataset_id: str, request: Request, svc: AnyService):
    dataset = await _find(svc, dataset_id, request)
    if dataset.spec.evaluate != "adm":
        raise ApiError(404, "unknown_file", f"dataset {dataset_id} was not made with evaluate: true for a model the "
                       "judge does not know: it has no ADM .npz (its shards are in its manifest)")
    path = svc.datasets.adm_file(dataset)
    if path is None:
        raise ApiError(409, "not_finished", f"dataset {dataset_id} is {dataset.status}: its ADM .npz is written once "
                       "every image is made", retry_after=5)
    return FileResponse(path, media_type=MEDIA["npz"], filename=path.name)


@router.delete("/{dataset_id}", responses=error_responses(401, 404, 503),
               summary="cancel a running dataset (finished shards stay until expiry); delete an ended one")
async def cancel(dataset_id: str, request: Request, svc: AnyService):
    dataset = await _find(svc, dataset_id, request)
    if dataset.status == "running":
        await _stored(svc.datasets.cancel, dataset)
    else:
        await _stored(svc.datasets.remove, dataset)
    return dataset.status_json()
