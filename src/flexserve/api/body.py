"""Request bodies, read with a size limit and a request id on every response."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flexserve.errors import RequestTooLarge

Header = tuple[bytes, bytes]


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


class _RandomIds:
    """Unpredictable ids without a system call each: os.urandom, read for a few hundred
    ids at a time (a getrandom() per request cost 3 % of the event loop's time at full
    load). Ids are made on the event loop's thread only."""

    BYTES = 12
    AT_ONCE = 256

    def __init__(self) -> None:
        self._pool = b""
        self._used = 0
        os.register_at_fork(after_in_child=self.forget)  # a forked worker must not repeat

    def new(self) -> str:
        if self._used + self.BYTES > len(self._pool):
            self._pool, self._used = os.urandom(self.BYTES * self.AT_ONCE), 0
        start, self._used = self._used, self._used + self.BYTES
        return "req_" + self._pool[start : self._used].hex()

    def forget(self) -> None:
        self._pool, self._used = b"", 0


new_request_id = _RandomIds().new


def with_request_id(headers: Iterable[Header], state: dict[str, Any]) -> list[Header]:
    """A response's headers with the request's id as `x-request-id` (its only one)."""
    request_id: str = state["request_id"]
    kept = [(k, v) for k, v in headers if k != b"x-request-id"]
    kept.append((b"x-request-id", request_id.encode()))
    return kept


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
                message["headers"] = with_request_id(message.get("headers", []), state)
            await send(message)

        await self.app(scope, receive, send_with_id)
