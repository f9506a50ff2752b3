"""While the server drains (SIGTERM), new requests get 503 with Retry-After.

uvicorn would close its listening socket at once, so clients would see connection
errors; instead the server keeps accepting during the grace period and answers here, an
OpenAI-shaped error that the SDK retries after Retry-After (on another replica behind a
load balancer, or on this one restarted). `/healthz` and `/metrics` still answer, so
that a load balancer sees the draining state.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from flexserve.api.errors import error_response
from flexserve.runtime import Fleet, shutting_down

STILL_ANSWERED = frozenset({"/healthz", "/metrics"})


class DrainGate:
    def __init__(self, app: ASGIApp, fleet: Fleet, retry_after_max: float) -> None:
        self.app = app
        self.fleet = fleet
        self.retry_after_max = retry_after_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.fleet.draining or scope["path"] in STILL_ANSWERED:
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id", "")
        await drain_refusal(request_id, self.retry_after_max)(scope, receive, send)


def drain_refusal(request_id: str, retry_after_max: float) -> Response:
    """503 with Retry-After, and the connection closed: the client should reconnect
    elsewhere (another replica, or this one restarted)."""
    response = error_response(shutting_down(), request_id, retry_after_max)
    response.headers["connection"] = "close"
    return response
