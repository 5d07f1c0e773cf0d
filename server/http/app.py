"""The HTTP app: the routers (server/http/routes/), the middleware, the error handlers and the docs.

No tensors here, and nothing that blocks the event loop: generation runs in the engine, encoding on the
service's pool; the routes only await their jobs, which the engine's outputs update (pushed).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from ..service.service import Service
from ..settings import Settings
from .answers import ANSWER_HEADERS
from .auth import ApiKeyAuth, api_keys
from .docs import ASSETS_PATH, DOCS_ASSETS, install_docs
from .errors import install_error_handlers
from .middleware import BodyLimit, RequestContext
from .routes import datasets, generate, jobs, system, webhook_secret
from .schemas import DatasetRequest, GenerateRequest, JobRequest
from .webhooks import Webhooks


def create_app(settings: Settings, engine=None, shared_store: bool = False) -> FastAPI:
    """The app; `engine` makes the service's engine handle (see Service), e.g. a Ray fleet's, whose
    front-ends may share their job store (`shared_store`)."""
    service = Service(settings, engine, shared_store=shared_store)
    webhooks = Webhooks(settings.webhook_secret, settings.webhook_allow_hosts, service.metrics,
                        keyed=bool(api_keys(settings)), try_deadline=settings.webhook_timeout)

    webhooks.on_result = service.jobs.delivered

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ready, loop = asyncio.Event(), asyncio.get_running_loop()
        service.on_ready = lambda: loop.call_soon_threadsafe(ready.set)
        service.datasets.on_end = lambda d: webhooks.deliver_soon(loop, d.id, d.owner or None, d.webhook_url,
                                                                  d.status_json, service.datasets.delivered)
        service.start()  # loads and warms up on its own thread; /readyz says when it is done
        resuming = asyncio.create_task(jobs.resume(app, ready))  # the job store's unfinished jobs, once ready
        yield
        resuming.cancel()
        await asyncio.to_thread(service.shutdown)  # finishes admitted jobs, which hands over their webhooks
        await webhooks.close(grace=settings.request_timeout)

    app = FastAPI(title="dit-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Class-conditional image generation with Diffusion Transformers (DiT).")
    app.state.service, app.state.webhooks = service, webhooks
    install_middleware(app, settings, service)
    install_error_handlers(app, {"/generate": list(GenerateRequest.model_fields),
                                 "/jobs": list(JobRequest.model_fields),
                                 "/datasets": list(DatasetRequest.model_fields)})
    install_docs(app, service, keyed=bool(api_keys(settings)))
    app.mount(ASSETS_PATH, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")  # before /static
    app.mount("/static", StaticFiles(directory=system.STATIC), name="static")
    app.include_router(system.router)
    app.include_router(generate.router)
    app.include_router(jobs.router)
    app.include_router(webhook_secret.router)
    app.include_router(datasets.router)
    if settings.fault_injection:
        app.include_router(system.faults)
    return app


def install_middleware(app: FastAPI, settings: Settings, service: Service) -> None:
    """Innermost first (Starlette puts the last added outermost): CORS, API keys, body limits, then
    request ids, access logs and the /generate metrics (outermost, so refused requests count too)."""
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Location", "Retry-After", *ANSWER_HEADERS])
    keys = api_keys(settings)
    if keys:
        # The playground and its assets hold no data: they load without a key, and the page asks for one.
        page = ["/", *(f"/static/{f.name}" for f in system.STATIC.iterdir() if f.is_file())]
        # Nor do the docs pages' assets (Swagger UI, ReDoc); the pages themselves and the schema open
        # without a key only when --open-paths lists /docs, /redoc and /openapi.json.
        docs = [f"{ASSETS_PATH}/{f.name}" for f in DOCS_ASSETS.iterdir() if f.is_file()]
        app.add_middleware(ApiKeyAuth, keys=keys, open_paths=[*settings.open_paths, *page, *docs])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    metrics = service.metrics

    def answered(path: str, status: int, seconds: float) -> None:
        if path == "/generate":  # every answer of /generate, validation errors and refusals included
            metrics.requests.labels(code=str(status)).inc()
            metrics.request_duration.observe(seconds)

    app.add_middleware(RequestContext, on_answer=answered)
