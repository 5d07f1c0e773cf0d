"""The server's own endpoints: the playground page, health and readiness, metrics, the model's classes
and facts, and (test only) fault injection."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from model import SAMPLERS
from model.cache import PRESETS as CACHE_PRESETS

from ...service.class_names import class_index
from ...service.requests import default_cache
from ..door import AnyService, ReadyService, not_ready, ready
from ..errors import ApiError, error_response, error_responses
from ..schemas import ClassesResponse

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()
faults = APIRouter()  # included only with --fault-injection


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "index.html")


@router.get("/healthz", summary="liveness: the process answers")
async def healthz():
    return {"status": "alive"}


@router.get("/readyz", summary="readiness: 200 once the model is loaded and warmed up", responses=error_responses(503))
async def readyz(svc: AnyService):
    if not svc.ready:
        return error_response(not_ready(svc))
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(svc: AnyService):
    # off the event loop: a fleet's front-end reads the others' series from the job store
    return Response(await asyncio.to_thread(svc.metrics_text), media_type=CONTENT_TYPE_LATEST)


@router.get("/classes", response_model=ClassesResponse, summary="class ids and names of the loaded model",
            responses=error_responses(401, 422, 503))
async def classes(svc: ReadyService, q: str | None = Query(None, max_length=200, description="only the classes "
                                                            "whose name contains this (case-insensitive)")):
    names = svc.model.info.class_names
    ids = range(len(names)) if q is None else class_index(tuple(names)).search(q)
    return {"classes": [{"id": i, "name": names[i]} for i in ids]}


@router.get("/info", summary="model, resolution, limits, defaults and batching policy",
            responses=error_responses(401, 503))
async def info(svc: ReadyService):
    r, settings = svc.model, svc.settings
    d = r.info.defaults
    return {
        "model": r.info.name, "space": r.info.space, "image_size": r.info.image_size,
        "num_classes": r.num_classes, "device": r.device, "dtype": r.dtype,
        "policy": settings.policy, "max_batch_rows": settings.max_batch_rows, "samplers": list(SAMPLERS),
        "defaults": {"sampler": d.sampler, "steps": d.steps, "cfg_scale": d.cfg_scale,
                     "guidance_interval": list(d.guidance_interval),
                     "cache": default_cache(r.info, settings).describe()},
        "cache_presets": {name: asdict(c) for name, c in CACHE_PRESETS.items()},
        "limits": {"max_steps": settings.max_steps, "max_images": settings.max_images,
                   "min_cfg_scale": settings.min_cfg_scale, "max_cfg_scale": settings.max_cfg_scale,
                   "max_queue": settings.max_queue, "request_timeout": settings.request_timeout},
    }


@faults.post("/_faults", include_in_schema=False)
async def arm_fault(request: Request, svc: AnyService):
    body = await request.json()
    try:
        kind, count = body["kind"], int(body.get("count", 1))
        # off the event loop: a fleet's engine is armed through a blocking call to a replica
        await asyncio.to_thread(ready(svc).arm_fault, kind, count)
    except (KeyError, ValueError) as e:
        raise ApiError(422, "invalid_request", str(e), "kind") from e
    return {"armed": body["kind"]}
