"""The HTTP app: routes, readiness, metrics, the playground page.

No tensors here, and nothing that blocks the event loop: generation runs in the engine (server/engine/),
encoding on its pool; the routes only wait on futures (server/answers.py).
"""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from model import SAMPLERS

from . import answers
from .auth import ApiKeyAuth, api_keys
from .class_names import class_index
from .encoding import MEDIA_TYPES
from .errors import ApiError, error_response, error_responses, install_error_handlers
from .jobs import jobs_router
from .middleware import BodyLimit, RequestContext
from .schemas import ClassesResponse, GenerateResponse, generate_request_model, job_request_model
from .service import Service
from .settings import Settings
from .webhooks import Webhooks

STATIC = Path(__file__).parent / "static"
# Swagger UI and ReDoc ship inside a Python package and are served from here, not from a CDN, so that
# /docs works on a host without internet access.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"


def create_app(settings: Settings, engine=None) -> FastAPI:
    """The app; `engine` makes the service's engine handle (see Service), e.g. a Ray fleet's."""
    service = Service(settings, engine)
    webhooks = Webhooks(settings.webhook_secret, settings.webhook_allow_hosts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()  # loads and warms up on its own thread; /readyz says when it is done
        yield
        await asyncio.to_thread(service.shutdown)  # finishes admitted jobs, which hands over their webhooks
        await webhooks.close(grace=settings.request_timeout)

    app = FastAPI(title="dit-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Class-conditional image generation with Diffusion Transformers (DiT).")
    app.state.service = service
    install_middleware(app, settings, service)
    GenerateRequest = generate_request_model(settings)
    JobRequest = job_request_model(GenerateRequest)
    install_error_handlers(app, {"/generate": list(GenerateRequest.model_fields),
                                 "/jobs": list(JobRequest.model_fields)})
    install_docs(app, service, keyed=bool(api_keys(settings)))

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    app.mount("/static/docs", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")  # before /static
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", summary="liveness: the process answers")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", summary="readiness: 200 once the model is loaded and warmed up",
             responses=error_responses(503))
    async def readyz():
        if not service.ready:
            return error_response(answers.not_ready(service))
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        return Response(service.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/classes", response_model=ClassesResponse, summary="class ids and names of the loaded model",
             responses=error_responses(401, 422, 503))
    async def classes(q: str | None = Query(None, max_length=200, description="only the classes whose name "
                                            "contains this (case-insensitive)")):
        names = answers.require_ready(service).model.info.class_names
        ids = range(len(names)) if q is None else class_index(tuple(names)).search(q)
        return {"classes": [{"id": i, "name": names[i]} for i in ids]}

    @app.get("/info", summary="model, resolution, limits, defaults and batching policy",
             responses=error_responses(401, 503))
    async def info():
        r = answers.require_ready(service).model
        d = r.info.defaults
        return {
            "model": r.info.name, "space": r.info.space, "image_size": r.info.image_size,
            "num_classes": r.num_classes, "device": r.device, "dtype": r.dtype,
            "policy": settings.policy, "max_batch_rows": settings.max_batch_rows, "samplers": list(SAMPLERS),
            "defaults": {"sampler": d.sampler, "steps": d.steps, "cfg_scale": d.cfg_scale,
                         "guidance_interval": list(d.guidance_interval)},
            "limits": {"max_steps": settings.max_steps, "max_images": settings.max_images,
                       "min_cfg_scale": settings.min_cfg_scale, "max_cfg_scale": settings.max_cfg_scale,
                       "max_queue": settings.max_queue, "request_timeout": settings.request_timeout},
        }

    @app.post(
        "/generate", summary="generate an image (a grid for num_images > 1)", response_class=Response,
        responses={200: {"model": GenerateResponse,
                         "content": {**{media: {} for media in MEDIA_TYPES.values()}, "text/event-stream": {}},
                         "description": "the image; with Accept: application/json base64 images + metadata; "
                                        "with Accept: text/event-stream progress events, then the JSON result"},
                   **error_responses(401, 408, 413, 415, 422, 429, 500, 503, 504)},
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:  # type: ignore[valid-type]
        accept = request.headers.get("accept", "")
        stream = "text/event-stream" in accept
        job = answers.make_job(service, body, request, separate=stream or "application/json" in accept,
                                  timeout=settings.request_timeout)
        answers.submit(service, job)
        if stream:
            return StreamingResponse(answers.progress_events(service, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return answers.render(service, job, await answers.wait(job, request))

    app.include_router(jobs_router(service, JobRequest, webhooks))
    if settings.fault_injection:
        @app.post("/_faults", include_in_schema=False)
        async def arm_fault(request: Request):
            body = await request.json()
            try:
                kind, count = body["kind"], int(body.get("count", 1))
                # off the event loop: a fleet's engine is armed through a blocking call to a replica
                await asyncio.to_thread(answers.require_ready(service).arm_fault, kind, count)
            except (KeyError, ValueError) as e:
                raise ApiError(422, "invalid_request", str(e), "kind") from e
            return {"armed": body["kind"]}
    return app


def install_docs(app: FastAPI, service: Service, keyed: bool) -> None:
    """/docs (Swagger UI) and /redoc from local assets, and an OpenAPI schema that states `class_id`'s
    maximum for the loaded model (it is built before the model loads, so it is completed once ready)
    and, with API keys on, how to send one."""
    assets = "/static/docs"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no call to an online validator

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                              redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
                              with_google_fonts=False)

    plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain_openapi()
        if not service.ready:
            app.openapi_schema = None  # complete it once the model is loaded
            return schema
        last = service.model.num_classes - 1
        for component in schema.get("components", {}).get("schemas", {}).values():
            class_id = component.get("properties", {}).get("class_id")
            for option in (class_id or {}).get("anyOf", [class_id] if class_id else []):
                if option.get("type") == "integer":
                    option["maximum"] = last
        if keyed:
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "one of the server's API keys"}}
            schema["security"] = [{"apiKey": []}]
        return schema

    app.openapi = openapi


def install_middleware(app: FastAPI, settings: Settings, service: Service) -> None:
    """Innermost first (Starlette puts the last added outermost): CORS, API keys, body limits, then
    request ids, access logs and the /generate metrics (outermost, so refused requests count too)."""
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Location", "Retry-After", *answers.ANSWER_HEADERS])
    keys = api_keys(settings)
    if keys:
        # The playground and its assets hold no data: they load without a key, and the page asks for one.
        page = ["/", *(f"/static/{f.name}" for f in STATIC.iterdir() if f.is_file())]
        # Nor do the docs pages' assets (Swagger UI, ReDoc); the pages themselves and the schema open
        # without a key only when --open-paths lists /docs, /redoc and /openapi.json.
        docs = [f"/static/docs/{f.name}" for f in DOCS_ASSETS.iterdir() if f.is_file()]
        app.add_middleware(ApiKeyAuth, keys=keys, open_paths=[*settings.open_paths, *page, *docs])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    metrics = service.metrics

    def answered(path: str, status: int, seconds: float) -> None:
        if path == "/generate":  # every answer of /generate, validation errors and refusals included
            metrics.requests.labels(code=str(status)).inc()
            metrics.request_duration.observe(seconds)

    app.add_middleware(RequestContext, on_answer=answered)
