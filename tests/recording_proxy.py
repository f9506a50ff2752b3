"""A recording HTTP proxy between flexserve and a real upstream engine, for tests.

It forwards every request as it is and relays the answer byte for byte (streams too),
recording what flexserve sent (path and JSON body) and the text deltas the engine
answered, so a test can check what a resumed call carried and what it got back. When
flexserve closes a stream (a pause), the proxy closes its upstream connection too, so the
engine sees the disconnect just as it would without the proxy.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.upstream import serve_app

HOP_BY_HOP = frozenset({"host", "content-length", "connection", "transfer-encoding"})


@dataclass
class Exchange:
    """One call through the proxy."""

    path: str
    body: dict[str, Any]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    """The engine's answer's status and headers (lower-case names)."""
    deltas: list[str] = field(default_factory=list)
    """Text of each streamed chunk the engine sent (chat `delta.content` or `text`)."""
    finish_reason: str | None = None
    tokens: list[tuple[int, str]] = field(default_factory=list)
    """llama-server's native stream (`return_tokens`): each token's id and its text."""

    @property
    def text(self) -> str:
        return "".join(self.deltas)


@dataclass
class RecordingProxy:
    target: str
    """The engine's root URL (without /v1)."""
    exchanges: list[Exchange] = field(default_factory=list)

    def calls(self, path: str) -> list[Exchange]:
        """The calls to `path` (e.g. /v1/completions), in order."""
        return [e for e in self.exchanges if e.path == path]

    def app(self) -> Starlette:
        route = Route("/{path:path}", self._forward, methods=["GET", "POST"])
        return Starlette(routes=[route])

    async def _forward(self, request: Request) -> Response:
        content = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        upstream = await http.send(
            http.build_request(
                request.method, self.target + request.url.path, content=content, headers=headers
            ),
            stream=True,
        )
        exchange = None
        if request.method == "POST" and content:
            exchange = Exchange(
                request.url.path, json.loads(content), upstream.status_code, dict(upstream.headers)
            )
            self.exchanges.append(exchange)
        relayed = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            self._relay(http, upstream, exchange),
            status_code=upstream.status_code,
            headers=relayed,
        )

    async def _relay(
        self, http: httpx.AsyncClient, upstream: httpx.Response, exchange: Exchange | None
    ) -> AsyncIterator[bytes]:
        pending = b""
        try:
            async for data in upstream.aiter_raw():
                if exchange is not None:
                    pending = _record(exchange, pending + data)
                yield data
        finally:
            with anyio.CancelScope(shield=True):  # closing must happen even when cancelled
                await upstream.aclose()
                await http.aclose()


def _record(exchange: Exchange, buffer: bytes) -> bytes:
    """Record the complete SSE `data:` lines in `buffer`; return the incomplete rest."""
    *lines, rest = buffer.split(b"\n")
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[len(b"data:") :])
        if "tokens" in chunk:  # llama-server's native /completion
            text = chunk.get("content") or ""
            ids = chunk["tokens"]
            exchange.tokens += [(i, text if n == len(ids) - 1 else "") for n, i in enumerate(ids)]
            exchange.deltas += [text] if text else []
            exchange.finish_reason = chunk.get("stop_type") or exchange.finish_reason
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            if text:
                exchange.deltas.append(text)
            exchange.finish_reason = choice.get("finish_reason") or exchange.finish_reason
    return rest


@contextmanager
def serve_proxy(proxy: RecordingProxy) -> Iterator[str]:
    """Serve `proxy` on a loopback port; yields its base URL (ending in /v1)."""
    with serve_app(proxy.app(), "recording proxy") as url:
        yield url
