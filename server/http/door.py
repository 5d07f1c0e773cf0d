"""What every route needs at the door: the service (a FastAPI dependency), readiness, and a validated
body turned into a job (server/service/requests.py builds its engine request)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..engine.request import ErrorKind, RequestError
from ..service.job import Job
from ..service.requests import InvalidSettings, new_request
from ..service.service import Service
from .errors import ApiError


def service(request: Request) -> Service:
    return request.app.state.service


def not_ready(svc: Service) -> ApiError:
    return ApiError.of(RequestError(ErrorKind.NOT_READY, f"not ready: {svc.status}"))


def ready(svc: Annotated[Service, Depends(service)]) -> Service:
    """The service, once it can serve (else 503 not_ready). Routes with a body check it after the body's
    validation instead (make_job), so that a bad body is a 422 whatever the server's state."""
    if not svc.ready:
        raise not_ready(svc)
    return svc


AnyService = Annotated[Service, Depends(service)]  # whatever its state
ReadyService = Annotated[Service, Depends(ready)]  # 503 until the model is loaded


def owner(request: Request) -> str | None:
    """A hash of the caller's API key (server/http/auth.py), None without keys."""
    return getattr(request.state, "owner", None)


def make_job(svc: Service, body, request: Request, *, fmt: str, separate: bool, timeout: float,
             tag: str | None = None, webhook_url: str | None = None) -> Job:
    """A job for a validated request body; omitted fields take the model's defaults."""
    ready(svc)
    try:
        engine_request = new_request(
            svc.model.info, svc.settings, class_id=body.class_id, class_name=body.class_name, sampler=body.sampler,
            steps=body.steps, cfg_scale=body.cfg_scale, guidance_interval=body.guidance_interval, seed=body.seed,
            cache=body.cache, num_images=body.num_images, previews=body.previews, owner=owner(request), timeout=timeout)
    except InvalidSettings as e:
        raise ApiError.invalid(e.problems) from e
    info = svc.model.info
    return Job(engine_request, info.name, info.class_names[engine_request.class_id],
               format=fmt, separate=separate, tag=tag, webhook_url=webhook_url)
