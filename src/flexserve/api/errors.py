"""The one mapping from any failure to an OpenAI-shaped JSON error and status."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from flexserve.errors import FlexserveError, InvalidRequest, MethodNotAllowed, NotFound

log = logging.getLogger("flexserve.api")
CLIENT_GONE = 499
"""nginx's status for a client that closed the connection; never reaches the client."""


def retry_headers(error: FlexserveError, retry_after_max: float) -> dict[str, str]:
    if error.retry_after is None:
        return {}
    seconds = max(1, math.ceil(error.retry_after))
    headers = {"retry-after": str(seconds), "retry-after-ms": str(round(error.retry_after * 1000))}
    # The SDK honours Retry-After up to 60 s; past that, tell it not to retry at all.
    headers["x-should-retry"] = "false" if seconds > retry_after_max else "true"
    return headers


def error_response(error: FlexserveError, request_id: str, retry_after_max: float) -> JSONResponse:
    headers = {"x-request-id": request_id, **retry_headers(error, retry_after_max)}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def install(app: FastAPI, retry_after_max: float) -> None:
    def request_id(request: Request) -> str:
        return getattr(request.state, "request_id", "")

    async def flexserve_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, FlexserveError)
        return error_response(error, request_id(request), retry_after_max)

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        mapped: FlexserveError
        if error.status_code == 404:
            mapped = NotFound(f"Unknown route {request.method} {request.url.path}.")
        elif error.status_code == 405:
            mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}.")
        else:
            mapped = InvalidRequest(str(error.detail))
        return error_response(mapped, request_id(request), retry_after_max)

    async def validation_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(InvalidRequest(str(error)), request_id(request), retry_after_max)

    async def client_gone(request: Request, error: Exception) -> Response:
        # A client that hangs up mid-body is routine (and cheap to repeat): one quiet
        # line, not a traceback, so that it cannot flood the log.
        log.info("client disconnected mid-request request_id=%s", request_id(request))
        return Response(status_code=CLIENT_GONE)

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error request_id=%s", request_id(request))
        mapped = FlexserveError("The server had an error while processing your request.")
        return error_response(mapped, request_id(request), retry_after_max)

    app.add_exception_handler(FlexserveError, flexserve_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)
