"""The one error shape of the API, `{"error": {"code", "message", "field", "errors"}}`, its handlers, and
the one table that maps the engine's error kinds to HTTP statuses (`STATUS`).

Invalid requests teach: every problem is listed (the first also in `field`), broken JSON says where,
a JSON body without `Content-Type: application/json` says so, and names from other libraries
(diffusers' `guidance_scale`, ...) get "did you mean".
"""

from __future__ import annotations

import difflib
import email.message
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.request import ErrorKind, RequestError
from ..service.requests import class_choice_problems

# What people coming from diffusers, A1111 or Replicate send, and what this API calls it.
FAMILIAR_NAMES = {
    "guidance_scale": "cfg_scale", "guidance": "cfg_scale", "cfg": "cfg_scale", "scale": "cfg_scale",
    "num_inference_steps": "steps", "num_steps": "steps", "sample_steps": "steps",
    "class_labels": "class_id", "class_label": "class_id", "label": "class_id", "labels": "class_id",
    "class": "class_id", "prompt": "class_name", "class_names": "class_name",
    "num_images_per_prompt": "num_images", "batch_size": "num_images", "n": "num_images", "n_samples": "num_images",
    "scheduler": "sampler", "sampler_name": "sampler", "generator": "seed", "seeds": "seed",
    "output_type": "format", "output_format": "format", "webhook": "webhook_url", "callback_url": "webhook_url",
}


class FieldError(BaseModel):
    field: str | None = Field(None, description="the request field at fault (dotted path), if one is")
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable kind, e.g. invalid_request, queue_full, deadline_exceeded")
    message: str = Field(description="what went wrong and what to do")
    field: str | None = Field(None, description="the request field at fault, if one is (the first, when several)")
    errors: list[FieldError] | None = Field(None, description="every problem found in the request (invalid "
                                            "requests only)")


class ErrorBody(BaseModel):
    """Every error answer of this API has this shape."""

    error: ErrorDetail


# Every error status this API answers, and the codes it answers with (the body is always ErrorBody).
ERROR_STATUSES = {
    401: "no valid API key (unauthorized; only with API keys on)",
    404: "no such job or dataset, or not this API key's (unknown_job, unknown_dataset, unknown_shard); no such "
         "path (not_found); no webhook secret to serve (no_webhook_secret)",
    405: "this path does not take this method (method_not_allowed; the Allow header lists those it takes)",
    406: "the Accept header accepts none of the answers this path gives (not_acceptable)",
    408: "the body did not arrive within --body-timeout (body_timeout)",
    409: "the job was cancelled (cancelled), or it or the shard has not finished yet (not_finished; see "
         "Retry-After)",
    413: "the body is larger than --max-body-bytes (body_too_large)",
    415: "the body is not sent as application/json (unsupported_media_type)",
    422: "invalid request: every problem listed, the first names its field (invalid_request)",
    429: "too busy: the queue is full (queue_full), the request could not finish before its deadline "
         "(overloaded), this API key has --max-requests-per-key in flight (key_quota_exceeded), or too many "
         "async jobs are held (too_many_jobs), or this key's datasets are running (too_many_datasets); see Retry-After",
    500: "generation failed (generation_failed)",
    501: "datasets on a fleet of several front-ends (datasets_unavailable)",
    503: "not ready, shutting down (not_ready), the engine died and restarts (engine_died), or the job store does "
         "not answer (store_unavailable, job requests only); see Retry-After",
    504: "no result before the request's deadline (deadline_exceeded)",
}


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI `responses` for these error statuses of a route."""
    return {s: {"model": ErrorBody, "description": ERROR_STATUSES[s]} for s in statuses}


# The HTTP status of each error kind the engine and the service end a request with.
STATUS = {
    ErrorKind.QUEUE_FULL: 429, ErrorKind.OVERLOADED: 429, ErrorKind.KEY_QUOTA_EXCEEDED: 429,
    ErrorKind.NOT_READY: 503, ErrorKind.ENGINE_DIED: 503, ErrorKind.INVALID_REQUEST: 422,
    ErrorKind.DEADLINE_EXCEEDED: 504, ErrorKind.CANCELLED: 409, ErrorKind.GENERATION_FAILED: 500,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None, errors: list[dict] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after
        self.errors = errors

    @classmethod
    def of(cls, e: RequestError) -> ApiError:
        """The answer to a request that ended in `e` (or was refused with it)."""
        return cls(STATUS[e.kind], e.kind.value, e.message, retry_after=e.retry_after)

    @classmethod
    def invalid(cls, problems: list[tuple[str | None, str]]) -> ApiError:
        """422 for one or more (field, message) problems: the first in `field` and `message`, all in `errors`."""
        field, message = problems[0]
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''}: see errors)"
        return cls(422, "invalid_request", message, field,
                   errors=[{"field": f, "message": m} for f, m in problems])

    def body(self) -> dict:
        """The ErrorBody of this error, as JSON data (`errors` only on invalid requests)."""
        detail = ErrorDetail(code=self.code, message=self.message, field=self.field, errors=self.errors)
        return {"error": detail.model_dump(exclude={"errors"} if self.errors is None else None)}


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The HTTP answer for `e` (also an ASGI app, for middleware that answers before the app runs)."""
    headers = dict(headers or {})
    if e.retry_after is not None:  # whole seconds, at least 1
        headers["Retry-After"] = str(max(1, round(e.retry_after)))
    return JSONResponse(e.body(), status_code=e.status, headers=headers or None)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    m = email.message.Message()
    m["content-type"] = content_type
    return m.get_content_maintype() == "application" and (m.get_content_subtype() == "json"
                                                          or m.get_content_subtype().endswith("+json"))


def _where(doc: str, pos: int) -> str:
    line = doc.count("\n", 0, pos) + 1
    column = pos - (doc.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {column}"


JOB_ONLY_FIELDS = ("webhook_url", "tag")


def unknown_field_message(field: str, known: list[str]) -> str:
    """What to say of one unknown field: where it belongs, or the field it most likely meant (the list of
    valid fields is said once for the whole body)."""
    if field in JOB_ONLY_FIELDS and field not in known:
        return f"{field} is for async jobs: POST /jobs takes it, /generate does not"
    hint = FAMILIAR_NAMES.get(field.lower())
    if hint is None or hint not in known:
        close = difflib.get_close_matches(field.lower(), known, n=1, cutoff=0.6)
        hint = close[0] if close else None
    return f"unknown field {field!r}: did you mean `{hint}`?" if hint else f"unknown field {field!r}"


_SOURCES = ("body", "query", "path", "header")
UNKNOWN_FIELDS_SHOWN = 20  # a body of thousands of unknown keys gets a short answer, made in little time


def validation_error(e: RequestValidationError, content_type: str | None, known_fields: list[str]) -> ApiError:
    errors = e.errors()
    first = errors[0]
    kind, loc = first.get("type"), first.get("loc", ())
    if kind == "json_invalid":
        where = _where(e.body, loc[-1]) if isinstance(e.body, str) and isinstance(loc[-1], int) else "somewhere"
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return ApiError.invalid([(None, f"the body is not valid JSON: {detail} at {where}")])
    if isinstance(e.body, bytes | bytearray) and e.body and not _is_json(content_type):
        got = f"Content-Type: {content_type}" if content_type else "no Content-Type"
        return ApiError(415, "unsupported_media_type", f"the body must be JSON sent with Content-Type: "
                        f"application/json (this request had {got})", "content-type")
    problems: list[tuple[str | None, str]] = []
    unknown = 0
    if kind == "unknown_fields":  # many: the body's model refused them at once (server/http/schemas.py)
        ctx = first["ctx"]
        problems = [(field, unknown_field_message(field, known_fields)) for field in ctx["first"]]
        errors, unknown = [], ctx["count"]
    for err in errors:
        loc = err.get("loc", ())
        field = ".".join(str(p) for p in loc[1 if loc and loc[0] in _SOURCES else 0:]) or None
        if err.get("type") == "extra_forbidden" and field is not None:
            unknown += 1
            if unknown > UNKNOWN_FIELDS_SHOWN:
                continue
            message = unknown_field_message(field, known_fields)
        elif err.get("type") == "missing" and field is None:
            message = "the body is empty (or null): send a JSON object, e.g. {\"class_id\": 3}"
        elif err.get("type") in ("model_attributes_type", "dict_type", "model_type") and field is None:
            message = "the body must be a JSON object, e.g. {\"class_id\": 3}"
        elif field == "class_id" and isinstance(err.get("input"), str):
            message = f"class_id: a class id is a number; to name a class, send class_name: {err['input']!r}"
        else:
            # pydantic prefixes what our validators raise with "Value error, ": the message is ours alone
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            message = f"{field}: {msg}" if field else msg
        problems.append((field, message))
    if unknown:
        more = f"and {unknown - UNKNOWN_FIELDS_SHOWN} more unknown fields; " if unknown > UNKNOWN_FIELDS_SHOWN else ""
        problems.append((None, f"{more}the fields are: {', '.join(known_fields)}"))
    if isinstance(e.body, Mapping):
        choice = class_choice_problems(e.body.get("class_id"), e.body.get("class_name"))
        problems += [p for p in choice if p[0] not in {f for f, _ in problems}]
    return ApiError.invalid(problems)


def install_error_handlers(app: FastAPI, fields: dict[str, list[str]]) -> None:
    """`fields`: the body fields of each POST path (for "did you mean")."""
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        known = fields.get(request.url.path, [])
        return error_response(validation_error(e, request.headers.get("content-type"), known))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(http_error(request, e), headers=e.headers)


# FastAPI's own words when json.loads fails for another reason than bad syntax (it raises a 400 from it).
_UNPARSABLE = "There was an error parsing the body"


def http_error(request: Request, e: StarletteHTTPException) -> ApiError:
    """Starlette's and FastAPI's own HTTP errors, in the API's shape with a code of their own."""
    if e.status_code == 405:
        allowed = (e.headers or {}).get("Allow", "")
        return ApiError(405, "method_not_allowed", f"{request.method} {request.url.path} is not served; this path "
                        f"takes {allowed or 'other methods'} (see /docs)")
    if e.status_code == 404:
        return ApiError(404, "not_found", f"no such path: {request.url.path} (see /docs for the API)")
    if e.status_code == 400 and e.detail == _UNPARSABLE:
        return ApiError.invalid([(None, f"the body is not valid JSON: {_why_unparsable(e.__cause__)}")])
    return ApiError(e.status_code, "http_error", str(e.detail))


def _why_unparsable(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "it is nested too deep"
    if isinstance(cause, ValueError):  # e.g. Python's limit of 4,300 digits for an integer
        return str(cause)
    return "it could not be parsed"
