"""Key management for admins: create (secret shown once), list, revoke."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flexserve.api.auth import authenticate_admin
from flexserve.api.body import read_body
from flexserve.api.state import app_state
from flexserve.api.validation import parse_body
from flexserve.api.wire import INT32_MAX
from flexserve.errors import InvalidRequest, NotFound
from flexserve.keys import DefaultTierNotAllowed, KeyLimits, make_key
from flexserve.scheduling.tiers import Tier
from flexserve.store import KeyRecord

ADMIN_BODY_LIMIT = 10_000


class LimitsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    requests_per_minute: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=INT32_MAX)
    concurrent_requests: int | None = Field(default=None, ge=1, le=INT32_MAX)


class NewKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tenant: str = Field(min_length=1, max_length=200)
    default_tier: Tier = "default"
    allowed_tiers: list[Tier] | None = Field(default=None, min_length=1)
    admin: bool = False
    limits: LimitsRequest = Field(default_factory=LimitsRequest)
    """Unset limits fall back to the config's defaults (`key_*` settings)."""


def _public(key: KeyRecord) -> dict[str, Any]:
    return {
        "id": key.key_id,
        "object": "api_key",
        "tenant": key.tenant,
        "prefix": key.prefix,
        "default_tier": key.default_tier,
        "allowed_tiers": list(key.allowed_tiers),
        "admin": key.is_admin,
        "created_at": int(key.created_at),
        "revoked": key.revoked,
        "from_config": key.from_config,
        "limits": {
            "requests_per_minute": key.requests_per_minute,
            "tokens_per_minute": key.tokens_per_minute,
            "concurrent_requests": key.concurrent_requests,
        },
    }


async def create_key(request: Request) -> Response:
    state = app_state(request)
    await authenticate_admin(request, state)
    asked = parse_body(NewKeyRequest, await read_body(request, ADMIN_BODY_LIMIT))
    options: dict[str, Any] = {"is_admin": asked.admin, "default_tier": asked.default_tier}
    if asked.allowed_tiers is not None:
        options["allowed_tiers"] = tuple(dict.fromkeys(asked.allowed_tiers))
    try:
        new = make_key(asked.tenant, limits=KeyLimits(**asked.limits.model_dump()), **options)
    except DefaultTierNotAllowed as error:
        raise InvalidRequest(str(error), param="default_tier") from None
    await asyncio.to_thread(state.store.add_key, new.record)
    return JSONResponse({**_public(new.record), "key": new.secret}, status_code=201)


async def list_keys(request: Request) -> Response:
    state = app_state(request)
    await authenticate_admin(request, state)
    keys = await asyncio.to_thread(state.store.list_keys, request.query_params.get("tenant"))
    return JSONResponse({"object": "list", "data": [_public(k) for k in keys]})


async def revoke_key(request: Request) -> Response:
    state = app_state(request)
    await authenticate_admin(request, state)
    key_id = request.path_params["key_id"]
    if not await asyncio.to_thread(state.store.revoke_key, key_id):
        raise NotFound(f"No API key with id '{key_id}'.", param="key_id")
    state.keys.forget()
    return JSONResponse({"id": key_id, "object": "api_key.deleted", "deleted": True})
