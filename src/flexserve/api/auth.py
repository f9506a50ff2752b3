"""Bearer keys: hashed before lookup, so the store never sees a secret."""

from __future__ import annotations

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
    key = await state.keys.find(hash_key(secret.strip()))
    if key is None:
        raise InvalidApiKey(f"Incorrect API key provided: {secret.strip()[:6]}****.")
    return key


async def authenticate_admin(request: Request, state: AppState) -> KeyRecord:
    key = await authenticate(request, state)
    if not key.is_admin:
        raise AdminRequired("This route needs an admin key.")
    return key
