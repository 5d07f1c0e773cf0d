"""GET /webhooks/secret: the Standard Webhooks secret that signs the calling API key's deliveries, for its
receiver to verify them with (server/http/webhooks.py derives one per key; no key can read another's)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..door import owner
from ..errors import ApiError, error_responses

router = APIRouter(tags=["jobs"])


class WebhookSecret(BaseModel):
    secret: str = Field(description="whsec_ secret: give it to your receiver's standardwebhooks.Webhook(...)")
    headers: list[str] = Field(description="the headers every delivery carries (Standard Webhooks)")


@router.get("/webhooks/secret", response_model=WebhookSecret, responses=error_responses(401, 404),
            summary="the secret that signs this API key's webhook deliveries")
async def webhook_secret(request: Request):
    webhooks, who = request.app.state.webhooks, owner(request)
    if webhooks.secret is None:
        raise ApiError(404, "no_webhook_secret", "webhooks are off on this server (no --webhook-secret)")
    if not webhooks.keyed or who is None:
        # Without keys anyone may call this path: the one secret is the operator's to hand out.
        raise ApiError(404, "no_webhook_secret", "this server has no API keys: its deliveries are signed with the "
                       "operator's --webhook-secret; ask the operator for it")
    body = {"secret": webhooks.secret_of(who), "headers": ["webhook-id", "webhook-timestamp", "webhook-signature"]}
    return JSONResponse(body, headers={"Cache-Control": "no-store"})  # a secret: no cache keeps it
