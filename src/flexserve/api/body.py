"""Request bodies, read with a size limit and a request id on every response."""

from __future__ import annotations

import os
import random

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flexserve.errors import RequestTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


_IDS = random.Random()  # seeded from os.urandom
"""Request ids need to be unique, not secret (every lookup by id is checked against the
tenant): a seeded PRNG gives 96 random bits without a getrandom() system call per
request, which cost 3 % of the event loop's time at full load."""
os.register_at_fork(after_in_child=_IDS.seed)  # a forked worker must not repeat ids


def new_request_id() -> str:
    return f"req_{_IDS.getrandbits(96):024x}"


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than this route's limit of {limit} bytes.")


class RequestIdMiddleware:
    """Gives each request an id (the ledger key) and returns it as `x-request-id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = new_request_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Read at send time: a retry that adopts an earlier attempt's answer
                # answers under that attempt's id (the ledger key).
                request_id: str = state["request_id"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
