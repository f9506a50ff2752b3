"""The generation routes, served ahead of FastAPI's middleware stack and router.

A POST to /v1/chat/completions, /v1/completions or /v1/responses would otherwise pass
FastAPI's telemetry check, its error, telemetry and body-limit middlewares, flexserve's
three (request id, drain gate, rate limit; each wraps `send` once more), the router's
match against every route and dependency solving for a handler that takes nothing but
the request: a fifth of the request path's CPU at full load (bench/overhead.py,
profiled). `FlexserveApp` (the app `create_app` returns, so tests take this path too)
hands those requests to `HotRoutes`, which does what those layers do for them, with the
same functions:

- a request id in the scope's state, returned as `x-request-id` (`with_request_id`);
- while draining, 503 and the connection closed (`drain_refusal`);
- the limiter's `x-ratelimit-*` headers (`with_limit_headers`), and its concurrency
  place freed when the exchange ends however it ends (`exchange_ended`);
- a flexserve or HTTP error answered by the app's own handler for it (api/errors.py),
  so its status and body are what the router would have answered; anything else goes
  to the app's catch-all handler (which logs it; a 500 if the response has not begun)
  and then on to the server, as Starlette's ServerErrorMiddleware does.

The endpoints are the ones registered with FastAPI for these paths, found there and
checked to take nothing but the request (so that nothing FastAPI would resolve is
skipped). Every other request, every request under a `root_path`, and every request
while FastAPI's OpenTelemetry is configured (`FlexserveApp.traced`) goes through FastAPI
as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from functools import cached_property
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from flexserve.api.body import new_request_id, with_request_id
from flexserve.api.draining import drain_refusal
from flexserve.api.limits import exchange_ended, with_limit_headers

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


class FlexserveApp(FastAPI):
    """FastAPI, with the generation routes served by `HotRoutes` ahead of the rest."""

    hot_routes: HotRoutes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.hot_routes
        endpoint = hot.endpoint(scope) if hot is not None and not self.root_path else None
        if endpoint is None or self.traced:
            await super().__call__(scope, receive, send)
            return
        assert hot is not None
        scope["app"] = self  # what Starlette sets: handlers find the app state there
        await hot.serve(endpoint, scope, receive, send)

    @cached_property
    def traced(self) -> bool:
        """FastAPI's own OpenTelemetry is on (an operator configured a tracer, meter or
        logger provider): then every route goes through FastAPI, so that each request
        still gets its span and metrics. Read once, at the first generation request
        (providers are set up before the server starts): FastAPI asks on every request,
        a measurable share of a short one's CPU."""
        telemetry = getattr(self, "_native_telemetry", None)
        return telemetry is not None and bool(telemetry.enabled())


class HotRoutes:
    """Serves the generation routes' requests as FastAPI's middlewares and router would
    (see the module's docstring)."""

    def __init__(
        self,
        fastapi: FastAPI,
        paths: Iterable[str],
        draining: Callable[[], bool],
        retry_after_max: float,
    ) -> None:
        self.fastapi = fastapi
        """Its routes and exception handlers are read at the first request (both are
        registered after this is made)."""
        self.paths = tuple(paths)
        self.draining = draining
        self.retry_after_max = retry_after_max

    def endpoint(self, scope: Scope) -> Endpoint | None:
        """The endpoint this request goes to past the router, if it is one of ours."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        return self._endpoints.get(scope["path"])

    async def serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = new_request_id()
        started = False

        def send_with_headers(message: Message) -> Awaitable[None]:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # Read at send time: a retry that adopts an earlier attempt's answer
                # answers under that attempt's id (the ledger key).
                headers = with_limit_headers(message.get("headers", []), state)
                message["headers"] = with_request_id(headers, state)
            return send(message)

        request = Request(scope, receive, send_with_headers)
        try:
            response = await self._respond(endpoint, request)
            await response(scope, receive, send_with_headers)
        except Exception as error:
            handler = None if started else self._handler_for(error)
            if handler is not None:  # raised as the response began, before any byte
                await (await handler(request, error))(scope, receive, send_with_headers)
                return
            # As Starlette's ServerErrorMiddleware does: the catch-all handler logs the
            # error and answers 500 if nothing was sent yet; the error then goes on to
            # the server, which logs it too, and closes a response that had begun.
            response = await self._catch_all(request, error)
            if not started:
                await response(scope, receive, send_with_headers)
            raise
        finally:
            exchange_ended(scope)

    async def _respond(self, endpoint: Endpoint, request: Request) -> Response:
        if self.draining():
            return drain_refusal(request.state.request_id, self.retry_after_max)
        try:
            return await endpoint(request)
        except Exception as error:
            handler = self._handler_for(error)
            if handler is None:
                raise
            return await handler(request, error)

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
        ExceptionMiddleware picks it; not the catch-all for `Exception` (`_catch_all`)."""
        handlers = self.fastapi.exception_handlers
        for kind in type(error).__mro__:
            if kind is Exception:
                return None
            handler = handlers.get(kind)
            if handler is not None:
                return handler  # type: ignore[return-value]
        return None

    async def _catch_all(self, request: Request, error: Exception) -> Response:
        """The app's handler for any other error (it logs it), as Starlette's
        ServerErrorMiddleware calls it; with none, the error goes to the server."""
        handler = self.fastapi.exception_handlers.get(Exception)
        if handler is None:
            raise error
        return await handler(request, error)  # type: ignore[no-any-return,misc]


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
