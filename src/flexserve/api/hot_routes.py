"""The generation routes, dispatched without FastAPI's router and per-request machinery.

A POST to /v1/chat/completions, /v1/completions or /v1/responses would otherwise pass
FastAPI's exception and exit-stack middlewares, its router's match against every route,
and dependency solving for a handler that takes nothing but the request: about a tenth
of the request path's CPU at full load (bench/overhead.py, profiled). The endpoints are
the ones registered with FastAPI for these paths, found there and checked to take
nothing but the request (so that nothing FastAPI would resolve is skipped), behind the
same middlewares (request id, drain gate, rate limit). A flexserve or HTTP error is
answered by the app's own handler for it (api/errors.py), so its status and body are
what the router would have answered; anything else propagates, as it does from the
router, to the outermost middleware, which logs it and answers 500. Under a `root_path`
the router's own matching applies (this shortcut stays out of the way).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from functools import cached_property

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


class HotRoutes:
    """Added as the innermost middleware, so that the others still wrap these routes."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, paths: Iterable[str]) -> None:
        self.app = app
        self.fastapi = fastapi
        """Its routes and exception handlers are read at the first request (both are
        registered after this middleware is added)."""
        self.paths = tuple(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._endpoint(scope)
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as error:
            handler = self._handler_for(error)
            if handler is None:
                raise
            response = await handler(request, error)
        await response(scope, receive, send)

    def _endpoint(self, scope: Scope) -> Endpoint | None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        return self._endpoints.get(scope["path"])

    @cached_property
    def _endpoints(self) -> dict[str, Endpoint]:
        found: dict[str, Endpoint] = {}
        for route in self.fastapi.routes:
            if not isinstance(route, APIRoute) or route.path not in self.paths:
                continue
            if "POST" in (route.methods or ()):
                if not _takes_only_the_request(route):
                    raise RuntimeError(f"{route.path}: FastAPI resolves more than the request")
                found[route.path] = route.endpoint
        missing = set(self.paths) - set(found)
        if missing:
            raise RuntimeError(f"no POST route for {sorted(missing)}")
        if any(isinstance(key, int) for key in self.fastapi.exception_handlers):
            raise RuntimeError("handlers by status code are not looked up here")
        return found

    def _handler_for(self, error: Exception) -> Handler | None:
        """The app's handler for the error's closest class, as Starlette's
        ExceptionMiddleware picks it; the catch-all for `Exception` is not one of them
        (the outermost middleware uses it, and logs the error)."""
        handlers = self.fastapi.exception_handlers
        for kind in type(error).__mro__:
            if kind is Exception:
                return None
            handler = handlers.get(kind)
            if handler is not None:
                return handler  # type: ignore[return-value]
        return None


def _takes_only_the_request(route: APIRoute) -> bool:
    """Nothing FastAPI would resolve for the endpoint is skipped here: no parameter, no
    body, and no dependency but the bearer scheme the generation routes declare for the
    OpenAPI document (with `auto_error` off it never answers on its own: the endpoint
    checks the key itself)."""
    dependant = route.dependant
    parameters = (
        dependant.path_params,
        dependant.query_params,
        dependant.header_params,
        dependant.cookie_params,
        dependant.body_params,
    )
    return not any(parameters) and all(
        isinstance(sub.call, HTTPBearer) and not sub.call.auto_error
        for sub in dependant.dependencies
    )
