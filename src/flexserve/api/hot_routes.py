"""The generation routes, dispatched without FastAPI's router and per-request machinery.

A POST to /v1/chat/completions, /v1/completions or /v1/responses would otherwise pass
FastAPI's exception and exit-stack middlewares, its router's match against every route,
and dependency solving for a handler that takes nothing but the request: about a tenth
of the request path's CPU at full load (bench/overhead.py, profiled). The handlers are
the same ones, behind the same middlewares (request id, drain gate, rate limit); their
errors go through the app's own exception handlers (api/errors.py), so every status and
body is what the router would have answered. The routes stay registered with FastAPI
too, for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    """Added as the innermost middleware, so that the others still wrap these routes."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, routes: Mapping[str, Endpoint]) -> None:
        self.app = app
        self.fastapi = fastapi
        """Read for its exception handlers when an error happens (installed after this)."""
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._endpoint(scope)
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as error:
            response = await self._error_response(request, error)
        await response(scope, receive, send)

    def _endpoint(self, scope: Scope) -> Endpoint | None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None  # under a root path, the router's own matching applies
        return self.routes.get(scope["path"])

    async def _error_response(self, request: Request, error: Exception) -> Response:
        """What the app's exception handler for this error answers (by its closest
        class, as Starlette's ExceptionMiddleware chooses)."""
        handlers = self.fastapi.exception_handlers
        for kind in type(error).__mro__:
            handler = handlers.get(kind)
            if handler is not None:
                response = await handler(request, error)  # type: ignore[misc]
                assert isinstance(response, Response)
                return response
        raise error
