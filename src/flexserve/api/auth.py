"""Bearer keys: hashed before lookup, so the store never sees a secret."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request

from flexserve.api.state import AppState
from flexserve.errors import AdminRequired, InvalidApiKey
from flexserve.keys import hash_key
from flexserve.store import KeyRecord


async def authenticate(request: Request, state: AppState) -> KeyRecord:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise InvalidApiKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    digest = hash_key(secret.strip())
    key = _cached(state, digest)
    if key is None:
        generation = state.key_generation
        key = await asyncio.to_thread(state.store.find_key, digest)
        if key is not None and not key.revoked and generation == state.key_generation:
            state.key_cache[digest] = (key, time.monotonic())
    if key is None or key.revoked:
        raise InvalidApiKey(f"Incorrect API key provided: {secret.strip()[:6]}****.")
    return key


def _cached(state: AppState, digest: str) -> KeyRecord | None:
    """A recent lookup; short-lived, so a revoke on another replica takes effect soon."""
    entry = state.key_cache.get(digest)
    if entry is None:
        return None
    key, cached_at = entry
    if time.monotonic() - cached_at > state.settings.key_cache_seconds:
        del state.key_cache[digest]
        return None
    return key


async def authenticate_admin(request: Request, state: AppState) -> KeyRecord:
    key = await authenticate(request, state)
    if not key.is_admin:
        raise AdminRequired("This route needs an admin key.")
    return key
