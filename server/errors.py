"""The one error shape of the API, `{"error": {"code", "message", "field"}}`, and its handlers."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .contracts import SchedulerError
from .schemas import ErrorBody


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after

    @classmethod
    def from_scheduler(cls, e: SchedulerError) -> "ApiError":
        return cls(e.status, e.code, str(e), retry_after=e.retry_after)

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after is not None else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


ERROR_RESPONSES = {s: {"model": ErrorBody, "description": d} for s, d in {
    422: "invalid request (the error names the field)", 429: "queue full (see Retry-After)",
    503: "not ready or shutting down (see Retry-After)", 504: "deadline passed", 500: "generation failed",
}.items()}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}; the fields are those of GenerateRequest in /docs"
        elif first.get("type") in ("json_invalid", "model_attributes_type"):
            message = "the body must be a JSON object, e.g. {\"class_id\": 3}"
        return error_response(ApiError(422, "invalid_request", message, field))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, "http_error", str(e.detail)))
