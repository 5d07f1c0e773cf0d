"""/docs (Swagger UI) and /redoc from local assets, and an OpenAPI schema completed with what depends on
this server and its model: the limits of the request fields (--max-steps, --max-images, the cfg_scale
range, class_id's maximum: the schema is built before the model loads, so it is completed once ready)
and, with API keys on, how to send one."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

from ..service.service import Service
from .errors import ERROR_STATUSES

# Swagger UI and ReDoc ship inside a Python package and are served from here, not from a CDN, so that
# /docs works on a host without internet access.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_PATH = "/static/docs"


def install_docs(app: FastAPI, service: Service, keyed: bool) -> None:
    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no call to an online validator

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                              redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_PATH}/favicon.png", with_google_fonts=False)

    plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain_openapi()
        _one_error_shape(schema)
        if not service.ready:
            app.openapi_schema = None  # complete it once the model is loaded
            return schema
        s = service.settings
        bounds = {"class_id": {"maximum": service.model.num_classes - 1}, "steps": {"maximum": s.max_steps},
                  "num_images": {"maximum": s.max_images},
                  "cfg_scale": {"minimum": s.min_cfg_scale, "maximum": s.max_cfg_scale}}
        for component in schema.get("components", {}).get("schemas", {}).values():
            for name, bound in bounds.items():
                _bound(component.get("properties", {}).get(name), bound)
        if keyed:
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "one of the server's API keys"}}
            schema["security"] = [{"apiKey": []}]
        return schema

    app.openapi = openapi


def _one_error_shape(schema: dict) -> None:
    """FastAPI documents the 422 of every route with parameters as its own HTTPValidationError, a shape
    this server never sends (server/http/errors.py answers every error as ErrorBody)."""
    fastapi_422 = "#/components/schemas/HTTPValidationError"
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            answer = operation.get("responses", {}).get("422")
            content = (answer or {}).get("content", {}).get("application/json", {})
            if content.get("schema", {}).get("$ref") == fastapi_422:
                content["schema"] = {"$ref": "#/components/schemas/ErrorBody"}
                answer["description"] = ERROR_STATUSES[422]
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _bound(prop: dict | None, bound: dict) -> None:
    """Write the bound into a property's numeric schema (itself, or its non-null option)."""
    for option in (prop or {}).get("anyOf", [prop] if prop else []):
        if option.get("type") in ("integer", "number"):
            option.update(bound)
