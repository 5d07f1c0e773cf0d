"""POST /generate: one generation, answered as the image (a grid for several), as JSON with
`Accept: application/json`, or as a stream of progress events with `Accept: text/event-stream`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ...service.encoding import MEDIA_TYPES
from .. import answers
from ..door import AnyService, make_job
from ..errors import error_responses
from ..schemas import GenerateRequest, GenerateResponse

router = APIRouter()


@router.post(
    "/generate", summary="generate an image (a grid for num_images > 1)", response_class=Response,
    responses={200: {"model": GenerateResponse,
                     "content": {**{media: {} for media in MEDIA_TYPES.values()}, "text/event-stream": {}},
                     "description": "the image; with Accept: application/json base64 images + metadata; "
                                    "with Accept: text/event-stream progress events, then the JSON result"},
               **error_responses(401, 406, 408, 413, 415, 422, 429, 500, 503, 504)},
)
async def generate(body: GenerateRequest, request: Request, svc: AnyService) -> Response:
    answer, fmt = answers.negotiate(body, request.headers.get("accept", ""))
    job = make_job(svc, body, request, fmt=fmt, separate=answer != "image", timeout=svc.settings.request_timeout)
    answers.submit(svc, job)
    if answer == answers.STREAM:
        return StreamingResponse(answers.progress_events(svc, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await answers.wait(job, request)
    return answers.render(svc, job)
